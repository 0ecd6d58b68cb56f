"""Dream (Dream-org/Dream-v0-Instruct-7B, Dream-v0-Base-7B): the family profile and its model calls.

A Dream is Qwen2.5 turned into a masked diffusion LM: one bidirectional stack over prompt + answer (the calls it
shares with LLaDA are in `one_stack.py`), and, because it was adapted from an autoregressive model, its logits are
shifted right by one: position i - 1's output predicts token i (`decode_hidden` reads the state before each canvas
position; the last prompt token predicts the first answer token). No self-conditioning, no AR co-loss:
`objective=dream`.

Facts (cite what the code uses):
- names: `dgtune/models/tiny_dream.py` (`modeling_dream.py`'s modules; mask id 151,666);
- LoRA: q/k/v/o of every layer's attention and its SwiGLU MLP (gate/up/down), anchored at `model.layers.N.` so
  that the head `lm_head` and the embedding are never adapted;
- the shift: `torch.cat([logits[:, :1], logits[:, :-1]], dim=1)` in Dream's sampler (`generation_utils.py`
  `_sample`) and trainers (DreamLM/DreamOn `src/trainer/fsdp_sft_expand_trainer.py`; `dllm`'s `MDLMTrainer` with
  `right_shift_logits`);
- noise and loss: `objective.kind=dream` (`dgtune.diffusion.objective`).
The real checkpoints load with `model.trust_remote_code=true` (their class is not in transformers).
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import unwrap
from dgtune.models.family import ModelFamily, register_family
from dgtune.models.families.one_stack import (  # noqa: F401 (calls this family shares: model_calls reads them here)
    PromptCache, canvas_hidden, decoder_context, encode, has_sliding_layers, no_self_conditioning, training_cache)

__all__ = ["DREAM", "PromptCache", "encode", "training_cache", "decoder_context", "decode_hidden", "lm_logits",
           "lm_head_weight", "self_conditioning_embeddings", "has_sliding_layers", "embedding_dtype", "vocab_size",
           "encoder_layers"]  # the family's model calls (`dgtune.diffusion.model_calls` reads them here)

DREAM = register_family(ModelFamily(
    name="dream",
    architectures=("DreamModel",),
    model_types=("Dream", "dream", "dgtune_tiny_dream"),
    model_class="AutoModel",
    lora_target_modules=r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    noise="mask",
    remote_code=True,  # DreamModel is not a transformers class: its modeling file ships with the checkpoint
    mask_token_id=151666,  # configuration_dream.py: mask_token_id 151,666
    calls=__name__,
    shard_units=("DreamDecoderLayer",),  # FSDP2 units (modeling_dream.py `_no_split_modules`)
))


def decode_hidden(model, canvas: torch.Tensor, cache: PromptCache, self_conditioning_logits=None,
                  self_conditioning_mask=None, decoder_attention_mask=None, decoder_position_ids=None,
                  self_conditioning_embeddings=None) -> torch.Tensor:
    """The stack over each row's [prompt ; canvas] (`one_stack.canvas_hidden` with shift 1: the state of position
    i - 1 predicts token i); returns the hidden states [b, l, d] that predict the canvas."""
    if self_conditioning_logits is not None or self_conditioning_embeddings is not None:
        raise no_self_conditioning("Dream", "dream")
    return canvas_hidden(lambda x, mask: base_hidden(unwrap(model), x, mask), canvas, cache, shift=1)


def base_hidden(core, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states [b, s, d] of the base model `core.model` (Dream's `DreamBaseModel`, and
    LLaDA-MoE's `LLaDAMoEModel`, hand their attention mask to SDPA as it is: a key mask [b, 1, 1, s] here, so that
    every query, padding's too, attends to the row's real tokens)."""
    return core.model(input_ids=x, attention_mask=mask.bool()[:, None, None, :], return_dict=False)[0]


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output head `lm_head` on hidden [b, l, d] -> [b, l, v]."""
    return unwrap(model).lm_head(hidden)


def lm_head_weight(model) -> tuple[torch.Tensor, float | None]:
    """(head weight [v, d], no soft-cap)."""
    return unwrap(model).lm_head.weight, None


def self_conditioning_embeddings(model, hidden, mask, chunk, loo=None):
    """The family has no self-conditioning."""
    raise no_self_conditioning("Dream", "dream")


def embedding_dtype(model) -> torch.dtype:
    """The token embedding's dtype."""
    return unwrap(model).model.embed_tokens.weight.dtype


def vocab_size(model) -> int:
    """The output vocabulary."""
    return unwrap(model).config.vocab_size


def encoder_layers(model) -> list:
    """The stack's layers (`model.layers`): gradient checkpointing wraps each (they read and write no cache)."""
    return list(unwrap(model).model.layers)
