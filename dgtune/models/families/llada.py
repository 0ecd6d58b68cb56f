"""LLaDA (GSAI-ML/LLaDA-8B-Instruct and its kin): the family profile and its model calls.

A LLaDA is one bidirectional Transformer over prompt + answer: the calls it shares with the other one-stack
families are in `one_stack.py` (every denoising pass runs the whole stack over each row's [prompt ; canvas] laid
out contiguously, padding after it, as LLaDA's SFT batches are). No self-conditioning, no AR co-loss:
`objective=llada`.

Facts (cite what the code uses):
- names and sizes: `dgtune/models/tiny_llada.py` (LLaDA-8B-Instruct's weight names; mask id 126,336);
- LoRA: q/k/v, attn_out and the SwiGLU MLP (ff_proj, up_proj, ff_out) of every block, anchored at
  `model.transformer.blocks.N.` so that the output head `model.transformer.ff_out` (which shares the last name with
  each block's down projection) is never adapted;
- noise and loss: `objective.kind=llada` (`dgtune.diffusion.objective`): ML-GSAI/LLaDA `GUIDELINES.md` ("SFT"):
  t ~ U(0, 1), p = (1 - 1e-3) t + 1e-3, each answer token (EOS padding included) masked with probability p,
  cross-entropy / p on the masked positions, / the answer length per row, / the batch size.
The real checkpoints load only with `model.trust_remote_code=true` (their class is not in transformers).
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import unwrap
from dgtune.models.family import ModelFamily, register_family
from dgtune.models.families.one_stack import (  # noqa: F401 (calls this family shares: model_calls reads them here)
    PromptCache, canvas_hidden, decoder_context, encode, has_sliding_layers, no_self_conditioning, training_cache)

__all__ = ["LLADA", "PromptCache", "encode", "training_cache", "decoder_context", "decode_hidden", "lm_logits",
           "lm_head_weight", "self_conditioning_embeddings", "has_sliding_layers", "embedding_dtype", "vocab_size",
           "encoder_layers"]  # the family's model calls (`dgtune.diffusion.model_calls` reads them here)

LLADA = register_family(ModelFamily(
    name="llada",
    architectures=("LLaDAModelLM",),  # LLaDA-MoE's model_type is also "llada": architecture first
    model_types=("llada", "dgtune_tiny_llada"),
    model_class="AutoModel",
    lora_target_modules=r"model\.transformer\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    noise="mask",
    remote_code=True,  # LLaDAModelLM is not a transformers class: its modeling file ships with the checkpoint
    mask_token_id=126336,  # GUIDELINES.md: mask id 126,336
    calls=__name__,
    # FSDP2 units: the real checkpoint's layers (modeling_llada.py, block_type "llama": LLaDALlamaBlock, its
    # `_no_split_modules`) and the tiny model's (LLaDABlock, their base class)
    shard_units=("LLaDALlamaBlock", "LLaDABlock"),
))


def decode_hidden(model, canvas: torch.Tensor, cache: PromptCache, self_conditioning_logits=None,
                  self_conditioning_mask=None, decoder_attention_mask=None, decoder_position_ids=None,
                  self_conditioning_embeddings=None) -> torch.Tensor:
    """The stack over each row's [prompt ; canvas] (`one_stack.canvas_hidden`, no shift: position i's own state
    predicts token i); returns the canvas' final-normed hidden states [b, l, d]. The row's prompt length comes from
    the cache's mask, so `decoder_attention_mask` and `decoder_position_ids` (DiffusionGemma's decoder arguments)
    are not needed."""
    if self_conditioning_logits is not None or self_conditioning_embeddings is not None:
        raise no_self_conditioning("LLaDA", "llada")
    return canvas_hidden(lambda x, mask: _final_hidden(unwrap(model), x, mask), canvas, cache, shift=0)


def _final_hidden(core, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states [b, s, d]: the tiny LLaDA's `hidden`, or the checkpoint's forward with
    `output_hidden_states` (LLaDA's modeling appends the state after `ln_f` last, as transformers does)."""
    if hasattr(core, "hidden"):
        return core.hidden(x, mask)
    return core(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output head `model.transformer.ff_out` on hidden [b, l, d] -> [b, l, v]."""
    return unwrap(model).model.transformer.ff_out(hidden)


def lm_head_weight(model) -> tuple[torch.Tensor, float | None]:
    """(head weight [v, d], no soft-cap)."""
    return unwrap(model).model.transformer.ff_out.weight, None


def self_conditioning_embeddings(model, hidden, mask, chunk, loo=None):
    """The family has no self-conditioning."""
    raise no_self_conditioning("LLaDA", "llada")


def embedding_dtype(model) -> torch.dtype:
    """The token embedding's dtype."""
    return unwrap(model).model.transformer.wte.weight.dtype


def vocab_size(model) -> int:
    """The output vocabulary."""
    return unwrap(model).config.vocab_size


def encoder_layers(model) -> list:
    """The stack's layers (`model.transformer.blocks`): gradient checkpointing wraps each (they read and write no cache)."""
    return list(unwrap(model).model.transformer.blocks)
