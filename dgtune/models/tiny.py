"""Build the tiny DiffusionGemma that dgtune ships: config, weights (random init) and a char-level tokenizer.

The model is a real `transformers.DiffusionGemmaForBlockDiffusion` (causal encoder + bidirectional decoder,
MoE layers, self-conditioning); only its sizes are small. The vision tower is a minimal stub because
`DiffusionGemmaConfig(vision_config=None)` would add a 169M-parameter default one.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    Gemma4VisionConfig,
    PreTrainedTokenizerFast,
)

# Special tokens first so that pad/eos/bos have DiffusionGemma's ids (0, 1, 2).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<mask>", "<unk>", "<|user|>", "<|model|>"]
CHARACTERS = list("0123456789.,:;+-*=|#()[] abcdefghijklmnopqrstuvwxyz\n")
IMAGE_TOKEN = "<|image|>"  # last id: DiffusionGemma's config needs image-token ids; text never contains it

# A chat template with one user turn and the model's answer; `add_generation_prompt` opens the model turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|model|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|model|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return a character-level fast tokenizer with special tokens and a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS + [IMAGE_TOKEN])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.add_special_tokens(SPECIAL_TOKENS + [IMAGE_TOKEN])
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_vision_stub() -> Gemma4VisionConfig:
    """A one-layer, 8-wide vision tower config (DiffusionGemma needs one; the default is 169M parameters)."""
    return Gemma4VisionConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        position_embedding_size=16,
    )


def build_tiny_config(
    vocab_size: int,
    hidden_size: int = 160,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 40,
    intermediate_size: int = 320,
    num_experts: int = 4,
    top_k_experts: int = 2,
    moe_intermediate_size: int = 160,
    canvas_length: int = 88,
    layer_types: list[str] | None = None,
) -> DiffusionGemmaConfig:
    """Return a small `DiffusionGemmaConfig` (all full-attention layers unless `layer_types`, tiny vision stub)."""
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        global_head_dim=head_dim,
        num_global_key_value_heads=num_key_value_heads,
        num_experts=num_experts,
        top_k_experts=top_k_experts,
        moe_intermediate_size=moe_intermediate_size,
        layer_types=list(layer_types or ["full_attention"] * num_hidden_layers),
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    # The image-token ids point at <|image|>, the last id, which text never contains.
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=build_vision_stub(),
        canvas_length=canvas_length,
        boi_token_id=vocab_size - 1,
        eoi_token_id=vocab_size - 1,
        image_token_id=vocab_size - 1,
    )


def build_tiny_model(seed: int = 0, **sizes) -> tuple[DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast]:
    """Build a randomly initialised tiny DiffusionGemma and its tokenizer."""
    import torch

    tokenizer = build_tokenizer()
    config = build_tiny_config(vocab_size=len(tokenizer), **sizes)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    return model, tokenizer
