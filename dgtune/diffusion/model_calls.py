"""The two model calls every dgtune component needs: encode a prompt into a KV cache, and denoise a canvas.

They reach into `DiffusionGemmaForBlockDiffusion` (wrapped by peft or not) so that training can encode once and
decode twice (self-conditioning) and the sampler can encode once and decode every step.
"""

from __future__ import annotations

import torch

from dgtune.diffusion.objective import softcap


def unwrap(model):
    """Return the `DiffusionGemmaForBlockDiffusion` inside a peft wrapper.

    A DDP/FSDP-wrapped model is refused: calling its encoder and decoder directly would skip the wrapper's
    forward, so gradients would never be all-reduced. Train through `dgtune.diffusion.loss.DenoisingLoss`
    (the module accelerate prepares) and sample with the unwrapped model."""
    if hasattr(model, "module"):  # DistributedDataParallel / FullyShardedDataParallel
        raise TypeError(f"{type(model).__name__}-wrapped model passed to a direct encoder/decoder call: wrap the loss "
                        "(dgtune.diffusion.loss.DenoisingLoss) instead, or pass accelerator.unwrap_model(...).model")
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place, so calls still use them
        model = model.get_base_model()
    return model


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, position_ids=None):
    """Run the causal encoder on input_ids [b, s]; returns (cache, last_hidden_state [b, s, d])."""
    core = unwrap(model)
    out = core.model.encoder(
        input_ids=input_ids, attention_mask=attention_mask, cache=cache, position_ids=position_ids, use_cache=True
    )
    return out.cache, out.last_hidden_state


def encoder_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits [b, s, v] (float32, soft-capped) for encoder hidden states."""
    core = unwrap(model)
    return softcap(core.lm_head(hidden), core.config.text_config.final_logit_softcapping)


def decode(
    model,
    canvas: torch.Tensor,
    cache,
    self_conditioning_logits: torch.Tensor | None = None,
    self_conditioning_mask: torch.Tensor | None = None,
    decoder_attention_mask=None,
    decoder_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise canvas [b, l] against the cached prompt; returns float32 soft-capped logits [b, l, v]."""
    core = unwrap(model)
    out = core.model.decoder(
        decoder_input_ids=canvas,
        cache=cache,
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=decoder_attention_mask,
        decoder_position_ids=decoder_position_ids,
    )
    return softcap(core.lm_head(out.last_hidden_state), core.config.text_config.final_logit_softcapping)
