"""A DiffusionGemma with the *shape* of `google/diffusiongemma-26B-A4B-it`, scaled down to tens of millions of
parameters and built in code (never downloaded).

It keeps what makes the 26B different from dgtune's tiny model: the 5-sliding : 1-full layer pattern with a
sliding window shorter than a training sequence, full layers with their own (wider) head dim and fewer KV heads and
keys used as values (no `v_proj`; transformers' DiffusionGemma always builds full layers that way, i.e. the 26B's
`attention_k_eq_v`), the dense MLP next to many routed experts in every layer (the 26B's `enable_moe_block`;
DiffusionGemma layers always have both), final-logit soft-capping 30, the proportional partial RoPE of full layers
and the 262,144-row embedding (tied with the LM head), which holds most of the parameters.

The tokenizer is the tiny model's character-level one (`dgtune.models.tiny.build_tokenizer`): its ids are a few
dozen, all < 262,144, and the remaining embedding rows are never read by text. What the shaped model reproduces is
the weight shapes and the compute (a 262,144-way LM head and soft-max), not a real vocabulary.

Real 26B numbers, where they come from, and the scaled value (defaults of `build_shaped_config`):

| field                          | 26B-A4B          | source | shaped |
|--------------------------------|------------------|--------|--------|
| vocab_size                     | 262144           | a, b   | 262144 |
| hidden_size                    | 2816             | a      | 128 |
| num_hidden_layers              | 30               | a, b   | 6 (one period of the pattern) |
| layer_types                    | (5 sliding, 1 full) x 5 | a, c | 5 sliding, 1 full |
| sliding_window                 | 1024             | a, b   | 16 (sudoku4 sequences are ~40-60 tokens) |
| num_attention_heads            | 16               | a      | 8 |
| num_key_value_heads (sliding)  | 8                | a      | 4 |
| head_dim (sliding)             | 256              | a      | 16 |
| num_global_key_value_heads     | 2                | a      | 1 |
| global_head_dim (full layers)  | 512              | a      | 32 |
| attention_k_eq_v (full layers) | true             | a      | always in DiffusionGemma |
| intermediate_size (dense MLP)  | 2112             | a      | 96 |
| enable_moe_block               | true             | a      | always in DiffusionGemma |
| num_experts / top_k_experts    | 128 / 8          | a, b   | 128 / 8 |
| moe_intermediate_size          | 704              | a      | 32 |
| final_logit_softcapping        | 30.0             | a, c   | 30.0 |
| rope sliding                   | default, theta 1e4 | a, c | same |
| rope full                      | proportional, 0.25, theta 1e6 | a, c | same |
| max_position_embeddings        | 262144 (256K context) | b | 262144 (no parameters depend on it) |
| canvas_length                  | 256              | b, c   | 32 |
| tie_word_embeddings            | true             | a, c   | true |

Sources: (a) the published `text_config` of `google/gemma-4-26B-A4B-it` (the backbone DiffusionGemma-26B is built
on), as quoted in public test fixtures found with the `search`/`find_string` tools: a JAX/TPU Gemma-4 loader's
`tests` (`GEMMA4_26B_A4B_TEXT`: hidden 2816, intermediate 2112, moe_intermediate 704, 16 heads, 8 KV heads, head_dim
256, global_head_dim 512, 2 global KV heads, 30 layers, 128 experts top-8, and from the 31B it extends: sliding
window 1024, 5:1 pattern, k_eq_v, soft-cap 30, the rope parameters) and a Swift MLX port's
`Gemma4MoEConfigTests` (the same MoE/attention numbers); (b) the SGLang cookbook page
https://docs.sglang.io/cookbook/autoregressive/Google/DiffusionGemma (30 layers, sliding window 1024, context 256K,
canvas 256, vocab 262K, 8 of 128 experts); (c) transformers 5.24 `DiffusionGemmaTextConfig` / `DiffusionGemmaConfig`
defaults (5:1 pattern, rope parameters, soft-cap 30, canvas 256), whose sizes otherwise describe a small dense
model, not the 26B.
"""

from __future__ import annotations

import torch
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    PreTrainedTokenizerFast,
)

from dgtune.models.tiny import IMAGE_TOKEN, build_tokenizer, build_vision_stub

PATTERN = ["sliding_attention"] * 5 + ["full_attention"]  # the 26B's period (x5 = 30 layers)


def build_shaped_config(
    vocab_size: int = 262_144,
    periods: int = 1,
    hidden_size: int = 128,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 4,
    head_dim: int = 16,
    num_global_key_value_heads: int = 1,
    global_head_dim: int = 32,
    intermediate_size: int = 96,
    num_experts: int = 128,
    top_k_experts: int = 8,
    moe_intermediate_size: int = 32,
    sliding_window: int = 16,
    canvas_length: int = 32,
    image_token_id: int | None = None,
) -> DiffusionGemmaConfig:
    """A `DiffusionGemmaConfig` with the 26B-A4B's structure at the sizes given (defaults: see the module table).

    `periods` repeats the 5-sliding : 1-full pattern (the 26B has 5). `image_token_id` (default: the last id)
    must be an id that text never contains."""
    if not 0 < top_k_experts < num_experts:
        raise ValueError(f"need 0 < top_k_experts < num_experts, got {top_k_experts} of {num_experts}")
    layer_types = PATTERN * periods
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=len(layer_types),
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=num_global_key_value_heads,
        num_experts=num_experts,
        top_k_experts=top_k_experts,
        moe_intermediate_size=moe_intermediate_size,
        layer_types=layer_types,
        sliding_window=sliding_window,
        final_logit_softcapping=30.0,
        max_position_embeddings=262_144,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    image_id = vocab_size - 1 if image_token_id is None else image_token_id
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=build_vision_stub(),
        canvas_length=canvas_length,
        boi_token_id=image_id,
        eoi_token_id=image_id,
        image_token_id=image_id,
    )


def build_shaped_model(
    vocab_size: int = 262_144, seed: int = 0, **sizes
) -> tuple[DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast]:
    """Build a randomly initialised 26B-shaped DiffusionGemma (sizes: `build_shaped_config` keywords) and the tiny
    model's tokenizer (its ids are < `vocab_size`; the image-token ids point at its `<|image|>`)."""
    tokenizer = build_tokenizer()
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} ids)")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = build_shaped_config(vocab_size=vocab_size, image_token_id=image_id, **sizes)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    return model, tokenizer
