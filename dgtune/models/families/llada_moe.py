"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct): the family profile and its model calls.

LLaDA-MoE is trained and sampled as LLaDA is (one bidirectional stack over [prompt ; answer], no shift:
`objective=llada`, `sampler=topk_confidence_mask`), but its modules have the transformers layout (`model.layers`,
`lm_head`) and its layers are mixtures of experts. Its calls are Dream's without the shift: the same base-model call
with a key mask and the same head (`dream.py`), reading position i's own state for token i.

Facts (cite what the code uses):
- names: `dgtune/models/tiny_llada_moe.py` (`modeling_lladamoe.py`'s modules); [MASK] 156,895 (the model card's
  `generate(mask_id=156895)`; not in its config.json);
- its `model_type` is "llada" in the released config (unsloth's profile: "LLaDA-MoE shares model_type llada with the
  dense model") and "lladamoe" in dllm's copy of the configuration: the architecture, checked first, tells it from
  LLaDA;
- LoRA: q/k/v/o of every layer's attention only (every layer is MoE: the router `mlp.gate` and the experts stay
  frozen, as unsloth's profile does), anchored at `model.layers.N.` so that `lm_head` is never adapted.
The real checkpoints load only with `model.trust_remote_code=true` (their class is not in transformers).
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import unwrap
from dgtune.models.families.dream import (  # noqa: F401 (the transformers-layout calls it shares with Dream)
    base_hidden, embedding_dtype, encoder_layers, lm_head_weight, lm_logits, vocab_size)
from dgtune.models.families.one_stack import (  # noqa: F401 (calls this family shares: model_calls reads them here)
    PromptCache, canvas_hidden, decoder_context, encode, has_sliding_layers, no_self_conditioning, training_cache)
from dgtune.models.family import ModelFamily, register_family

__all__ = ["LLADA_MOE", "PromptCache", "encode", "training_cache", "decoder_context", "decode_hidden", "lm_logits",
           "lm_head_weight", "self_conditioning_embeddings", "has_sliding_layers", "embedding_dtype", "vocab_size",
           "encoder_layers"]

LLADA_MOE = register_family(ModelFamily(
    name="llada_moe",
    architectures=("LLaDAMoEModel", "LLaDAMoEModelLM"),  # model_type "llada" is the dense LLaDA's too
    model_types=("lladamoe", "dgtune_tiny_llada_moe"),
    model_class="AutoModel",
    lora_target_modules=r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    router_param="mlp.gate.",
    quant_skip_modules=("mlp.gate", "lm_head"),
    noise="mask",
    remote_code=True,
    mask_token_id=156895,  # the model card's generate(mask_id=156895)
    calls=__name__,
    shard_units=("LLaDAMoEDecoderLayer",),  # FSDP2 units (modeling_lladamoe.py `_no_split_modules`)
))


def decode_hidden(model, canvas: torch.Tensor, cache: PromptCache, self_conditioning_logits=None,
                  self_conditioning_mask=None, decoder_attention_mask=None, decoder_position_ids=None,
                  self_conditioning_embeddings=None) -> torch.Tensor:
    """The stack over each row's [prompt ; canvas] (`one_stack.canvas_hidden`, no shift); returns the canvas'
    final-normed hidden states [b, l, d]."""
    if self_conditioning_logits is not None or self_conditioning_embeddings is not None:
        raise no_self_conditioning("LLaDA-MoE", "llada")
    return canvas_hidden(lambda x, mask: base_hidden(unwrap(model), x, mask), canvas, cache, shift=0)


def self_conditioning_embeddings(model, hidden, mask, chunk, loo=None):
    """The family has no self-conditioning."""
    raise no_self_conditioning("LLaDA-MoE", "llada")
