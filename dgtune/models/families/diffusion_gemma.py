"""DiffusionGemma (`DiffusionGemmaForBlockDiffusion`, transformers): its profile and its model calls.

The profile (`DIFFUSION_GEMMA`) holds the family's facts: classes, LoRA target pattern, router parameter,
quantisation skip list, noise. The calls below are what `dgtune.diffusion.model_calls` (the family-neutral front
door every component imports) runs for this family: encode a prompt into a KV cache (causal encoder), denoise a
canvas against it (bidirectional decoder, self-conditioning input), the LM head, and the cache / mask cuts that let
training decode after a right-padded encoder pass. They reach into the model (peft-wrapped or not) so that training
can encode once and decode twice and the sampler can encode once and decode every step. A second family is a
second module like this one in `dgtune/models/families/`.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch

from dgtune.diffusion.chunked import soft_embeddings
from dgtune.diffusion.model_calls import unwrap
from dgtune.diffusion.objective import softcap
from dgtune.models.family import ModelFamily, register_family


DIFFUSION_GEMMA = register_family(ModelFamily(
    name="diffusion_gemma",
    architectures=("DiffusionGemmaForBlockDiffusion",),
    model_types=("diffusion_gemma",),
    model_class="DiffusionGemmaForBlockDiffusion",
    # attention q/k/v/o and the dense MLP of the encoder's and the decoder's layers: the released reference
    # fine-tune's targets; the LM head, the self-conditioning MLP, router and experts are not matched
    lora_target_modules=r"model\.(encoder\.language_model|decoder)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    router_param=".router.",  # router.proj.weight, router.scale, router.per_expert_scale
    # the tied LM head and the router projections (exact routing, 0.04% of the 26B); transformers' default skip
    # list would quantise no layer linear at all (dgtune.models.quant)
    quant_skip_modules=("lm_head", "router.proj"),
    noise="uniform",
    self_conditioning=True,  # the released objective conditions on the previous pass' logits
    expert_parameters=("experts.gate_up_proj", "experts.down_proj"),  # [E, 2 Ie, H] and [E, H, Ie] per layer
    shard_units=("DiffusionGemmaDecoderTextLayer", "DiffusionGemmaEncoderTextLayer"),
    hf_checkpointing=True,  # transformers checkpoints the decoder layers; dgtune the encoder's (cache-aware)
    calls=__name__,  # this module: encode, decode_hidden, ... below
    fused_decoder=True,  # dgtune.sampling.fused_decoder implements its decoder layers
))


@functools.lru_cache(maxsize=None)
def cache_arg(module_type: type) -> str:
    """The name of the KV-cache argument of `module_type.forward`: transformers renamed `past_key_values` to `cache`
    after 5.17 (dgtune supports both ends; eval/ci/test_low_pins.sh tests 5.17)."""
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, position_ids=None):
    """Run the causal encoder on input_ids [b, s]; returns (cache, last_hidden_state [b, s, d])."""
    core = unwrap(model)
    enc = core.model.encoder
    out = enc(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
              **{cache_arg(type(enc)): cache})
    return getattr(out, cache_arg(type(enc))), out.last_hidden_state


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits [..., v] (float32, soft-capped) for final hidden states [..., d] of the encoder or decoder."""
    core = unwrap(model)
    return softcap(core.lm_head(hidden), core.config.text_config.final_logit_softcapping)


def lm_head_weight(model) -> tuple[torch.Tensor, float | None]:
    """(LM-head weight [v, d], final-logit soft-cap) for the chunked losses (`dgtune.diffusion.chunked`)."""
    core = unwrap(model)
    head = core.lm_head
    if getattr(head, "bias", None) is not None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"objective.loss_chunk needs a bias-free linear LM head, got {type(core.lm_head).__name__}")
    return core.lm_head.weight, core.config.text_config.final_logit_softcapping


def self_conditioning_embeddings(model, hidden: torch.Tensor, mask: torch.Tensor | None, chunk: int,
                                 loo: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The decoder's self-conditioning input [b, l, d] from a first pass' hidden states [b, l, d], computed `chunk`
    tokens at a time instead of from [b, l, v] logits; pass it to `decode_hidden(self_conditioning_embeddings=)`.
    loo = (observed canvas [b, l], t [b]): the logits are read as leave-one-out and converted to the denoiser
    posterior first (as `loo_to_denoiser_logits`)."""
    core = unwrap(model)
    weight, cap = lm_head_weight(model)
    embed = core.model.decoder.embed_tokens
    return soft_embeddings(hidden, weight, embed.weight, embed.embed_scale, cap, chunk, mask, loo)


def decode_hidden(
    model,
    canvas: torch.Tensor,
    cache,
    self_conditioning_logits: torch.Tensor | None = None,
    self_conditioning_mask: torch.Tensor | None = None,
    decoder_attention_mask=None,
    decoder_position_ids: torch.Tensor | None = None,
    self_conditioning_embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise canvas [b, l] against the cached prompt; returns the decoder's final hidden states [b, l, d].

    `self_conditioning_embeddings` [b, l, d] (mask already applied) replaces `self_conditioning_logits`: the decoder
    turns logits into softmax(logits) @ embedding before its self-conditioning block, which receives this instead.
    """
    core = unwrap(model)
    hook = None
    if self_conditioning_embeddings is not None:
        if self_conditioning_logits is not None:
            raise ValueError("pass self_conditioning_logits or self_conditioning_embeddings, not both")

        def _signal(_module, args):  # DiffusionGemmaSelfConditioning(inputs_embeds, soft_embeddings)
            if len(args) != 2:
                raise RuntimeError("transformers' decoder no longer calls self_conditioning(inputs_embeds, signal)")
            return args[0], self_conditioning_embeddings

        hook = core.model.decoder.self_conditioning.register_forward_pre_hook(_signal)
    try:
        out = core.model.decoder(
            decoder_input_ids=canvas,
            **{cache_arg(type(core.model.decoder)): cache},
            self_conditioning_logits=self_conditioning_logits,
            self_conditioning_mask=self_conditioning_mask,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
        )
    finally:
        if hook is not None:
            hook.remove()
    return out.last_hidden_state


def has_sliding_layers(model) -> bool:
    """Whether the model has sliding-window attention layers."""
    return "sliding_attention" in unwrap(model).config.text_config.layer_types


def training_cache(model):
    """The cache to pass to `encode` for a training batch: None (the model's own cache) without sliding layers; with
    them a plain `DynamicCache`, which keeps every layer's full keys/values (a sliding-window cache keeps only the last
    W-1 tokens of prompt + response + padding) for `decoder_context` to cut per row."""
    from transformers import DynamicCache

    return DynamicCache() if has_sliding_layers(model) else None


def decoder_context(model, cache, prompt_len: torch.Tensor, canvas_length: int):
    """(cache, decoder_attention_mask) to decode canvases [b, l] after a right-padded encoder pass whose rows hold
    prompts of lengths prompt_len [b] (then response / padding), such that every decoder layer sees what it sees when
    sampling after encoding the prompt alone: full layers the prompt [0, P), sliding layers what a sliding-window
    cache keeps of it, the last W-1 tokens [max(0, P - W + 1), P), and all layers the whole canvas.

    Without sliding layers: the encoder's cache and a 2D mask [b, s + l]. With them (the cache from `training_cache`):
    a shallow copy of the cache cut to the columns some row needs (full layers [0, max P), sliding layers
    [min lo, max P)) and one 4D mask per layer type (the attention implementation's format)."""
    core = unwrap(model)
    text = core.config.text_config
    device = prompt_len.device
    b = prompt_len.shape[0]
    s = cache.get_seq_length()
    canvas_cols = torch.ones(b, canvas_length, dtype=torch.bool, device=device)  # [b, l]
    if not has_sliding_layers(model):
        cache_mask = torch.arange(s, device=device)[None, :] < prompt_len[:, None]  # [b, s]
        return cache, torch.cat([cache_mask, canvas_cols], dim=1).long()  # [b, s + l]
    if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        raise ValueError("decoder_context needs the full cache of `training_cache(model)` for a model with "
                         "sliding-window layers")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function

    hi = int(prompt_len.max())
    first = (prompt_len - (text.sliding_window - 1)).clamp(min=0)  # [b] first prompt token a sliding cache keeps
    cuts = {"full_attention": torch.zeros_like(prompt_len), "sliding_attention": first}
    out = copy.copy(cache)
    out.layers = []
    for kind, layer in zip(text.layer_types, cache.layers):
        lo = int(cuts[kind].min())
        layer = copy.copy(layer)
        layer.keys, layer.values = layer.keys[:, :, lo:hi], layer.values[:, :, lo:hi]  # [b, h, hi - lo, d]
        out.layers.append(layer)
    masks = {}
    for kind, start in cuts.items():
        lo = int(start.min())
        cols = torch.arange(lo, hi, device=device)[None, :]  # [1, hi - lo] absolute prompt positions
        visible = (cols >= start[:, None]) & (cols < prompt_len[:, None])  # [b, hi - lo]
        padding = torch.cat([visible, canvas_cols], dim=1)  # [b, hi - lo + l]
        masks[kind] = ALL_MASK_ATTENTION_FUNCTIONS[text._attn_implementation](
            batch_size=b, q_length=canvas_length, kv_length=padding.shape[1], q_offset=0, kv_offset=0,
            mask_function=bidirectional_mask_function, attention_mask=padding, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, dtype=core.model.decoder.embed_tokens.weight.dtype, config=text,
            use_vmap=False, device=device,
        )
    return out, masks


def embedding_dtype(model) -> torch.dtype:
    """The dtype of the decoder's token embeddings (the self-conditioning logits are kept in it, as generate() does)."""
    return unwrap(model).model.decoder.embed_tokens.weight.dtype


def vocab_size(model) -> int:
    """The size of the vocabulary the decoder predicts over."""
    return unwrap(model).config.text_config.vocab_size


def encoder_layers(model) -> list:
    """The encoder's transformer layers (dgtune's cache-aware gradient checkpointing wraps each; transformers' own
    covers the decoder's)."""
    return list(unwrap(model).model.encoder.language_model.layers)
