"""The two model calls every dgtune component needs: encode a prompt into a KV cache, and denoise a canvas.

They reach into `DiffusionGemmaForBlockDiffusion` (wrapped by peft or not) so that training can encode once and
decode twice (self-conditioning) and the sampler can encode once and decode every step.
"""

from __future__ import annotations

import torch

from dgtune.diffusion.chunked import soft_embeddings
from dgtune.diffusion.objective import softcap


def unwrap(model):
    """Return the `DiffusionGemmaForBlockDiffusion` inside a peft / accelerate wrapper."""
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
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


def self_conditioning_embeddings(model, hidden: torch.Tensor, mask: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """The decoder's self-conditioning input [b, l, d] from a first pass' hidden states [b, l, d], computed `chunk`
    tokens at a time instead of from [b, l, v] logits; pass it to `decode_hidden(self_conditioning_embeddings=)`."""
    core = unwrap(model)
    weight, cap = lm_head_weight(model)
    embed = core.model.decoder.embed_tokens
    return soft_embeddings(hidden, weight, embed.weight, embed.embed_scale, cap, chunk, mask)


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
            cache=cache,
            self_conditioning_logits=self_conditioning_logits,
            self_conditioning_mask=self_conditioning_mask,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
        )
    finally:
        if hook is not None:
            hook.remove()
    return out.last_hidden_state


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
    hidden = decode_hidden(model, canvas, cache, self_conditioning_logits, self_conditioning_mask,
                           decoder_attention_mask, decoder_position_ids)  # [b, l, d]
    return lm_logits(model, hidden)
