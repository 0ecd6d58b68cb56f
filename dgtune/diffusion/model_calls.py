"""The model calls every dgtune component makes (the training objective, both samplers, eval): encode a prompt
into a KV cache, denoise a canvas against it, the LM head, and the facts of the model they need (vocabulary,
embedding dtype, sliding-window layers). This module is family-neutral: each call runs the implementation of the
model's family (`dgtune.models.family.family_of(model).calls`, e.g. `dgtune.models.families.diffusion_gemma`),
looked up once per model class.
"""

from __future__ import annotations

import importlib

import torch


def unwrap(model):
    """Return the model inside a peft wrapper (the family's own class, e.g. `DiffusionGemmaForBlockDiffusion`).

    A DDP/FSDP-wrapped model is refused: calling its encoder and decoder directly would skip the wrapper's
    forward, so gradients would never be all-reduced. Train through `dgtune.diffusion.loss.DenoisingLoss`
    (the module accelerate prepares) and sample with the unwrapped model."""
    if hasattr(model, "module"):  # DistributedDataParallel / FullyShardedDataParallel
        raise TypeError(f"{type(model).__name__}-wrapped model passed to a direct encoder/decoder call: wrap the loss "
                        "(dgtune.diffusion.loss.DenoisingLoss) instead, or pass accelerator.unwrap_model(...).model")
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place, so calls still use them
        model = model.get_base_model()
    return model


_CALLS: dict[type, object] = {}  # model class -> its family's calls module


def family_calls(model):
    """The module implementing the model calls of `model`'s family (found once per model class)."""
    core = unwrap(model)
    calls = _CALLS.get(type(core))
    if calls is None:
        from dgtune.models.family import family_of

        calls = _CALLS[type(core)] = importlib.import_module(family_of(core).calls)
    return calls


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, position_ids=None):
    """Run the causal encoder on input_ids [b, s]; returns (cache, last_hidden_state [b, s, d])."""
    return family_calls(model).encode(model, input_ids, attention_mask, cache, position_ids)


def decode_hidden(model, canvas: torch.Tensor, cache, self_conditioning_logits: torch.Tensor | None = None,
                  self_conditioning_mask: torch.Tensor | None = None, decoder_attention_mask=None,
                  decoder_position_ids: torch.Tensor | None = None,
                  self_conditioning_embeddings: torch.Tensor | None = None,
                  clean_canvas: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise canvas [b, l] against the cached prompt; returns the decoder's final hidden states [b, l, d].
    `self_conditioning_embeddings` [b, l, d] (from `self_conditioning_embeddings`) replaces the logits.
    `clean_canvas` [b, l] (training a block-diffusion family, `block_diffusion(model)`): each block of the canvas is
    denoised seeing the clean blocks before it (the [x_t ; x_0] layout)."""
    extra = {} if clean_canvas is None else {"clean_canvas": clean_canvas}
    return family_calls(model).decode_hidden(model, canvas, cache, self_conditioning_logits, self_conditioning_mask,
                                             decoder_attention_mask, decoder_position_ids, self_conditioning_embeddings,
                                             **extra)


def block_diffusion(model) -> bool:
    """Whether the model's family is block diffusion (`ModelFamily.block_diffusion`): trained with the clean canvas
    beside the noisy one, sampled by `dgtune.sampling.block`."""
    from dgtune.models.family import family_of

    return family_of(unwrap(model)).block_diffusion


def decode(model, canvas: torch.Tensor, cache, self_conditioning_logits: torch.Tensor | None = None,
           self_conditioning_mask: torch.Tensor | None = None, decoder_attention_mask=None,
           decoder_position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise canvas [b, l] against the cached prompt; returns float32 soft-capped logits [b, l, v]."""
    calls = family_calls(model)
    hidden = calls.decode_hidden(model, canvas, cache, self_conditioning_logits, self_conditioning_mask,
                                 decoder_attention_mask, decoder_position_ids)  # [b, l, d]
    return calls.lm_logits(model, hidden)


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits [..., v] (float32, soft-capped) for final hidden states [..., d] of the encoder or decoder."""
    return family_calls(model).lm_logits(model, hidden)


def lm_head_weight(model) -> tuple[torch.Tensor, float | None]:
    """(LM-head weight [v, d], final-logit soft-cap) for the chunked losses (`dgtune.diffusion.chunked`)."""
    return family_calls(model).lm_head_weight(model)


def self_conditioning_embeddings(model, hidden: torch.Tensor, mask: torch.Tensor | None, chunk: int,
                                 loo: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The decoder's self-conditioning input [b, l, d] from a first pass' hidden states [b, l, d], `chunk` tokens at
    a time (no [b, l, v] logits); loo = (observed canvas [b, l], t [b]) reads the logits as leave-one-out."""
    return family_calls(model).self_conditioning_embeddings(model, hidden, mask, chunk, loo)


def embedding_dtype(model) -> torch.dtype:
    """The dtype of the decoder's token embeddings (the self-conditioning logits are kept in it, as generate() does)."""
    return family_calls(model).embedding_dtype(model)


def vocab_size(model) -> int:
    """The size of the vocabulary the decoder predicts over."""
    return family_calls(model).vocab_size(model)


def encoder_layers(model) -> list:
    """The layers dgtune checkpoints itself (DiffusionGemma: the encoder's; a one-stack family: every layer)."""
    return family_calls(model).encoder_layers(model)


def has_sliding_layers(model) -> bool:
    """Whether the model has sliding-window attention layers."""
    return family_calls(model).has_sliding_layers(model)


def training_cache(model):
    """The cache to pass to `encode` for a right-padded training batch (None: the model's own)."""
    return family_calls(model).training_cache(model)


def decoder_context(model, cache, prompt_len: torch.Tensor, canvas_length: int):
    """(cache, decoder_attention_mask) to decode canvases [b, l] after a right-padded encoder pass whose rows hold
    prompts of lengths prompt_len [b], such that every decoder layer sees what it sees when sampling after encoding
    the prompt alone (see the family's implementation)."""
    return family_calls(model).decoder_context(model, cache, prompt_len, canvas_length)
