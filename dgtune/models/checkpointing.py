"""Gradient (activation) checkpointing (`trainer.gradient_checkpointing`): DiffusionGemma's encoder and decoder
layers, and every layer of a one-stack family (LLaDA, Dream: no cache, a plain non-reentrant checkpoint each).

The decoder layers are transformers' `GradientCheckpointingLayer`s (they only read the KV cache), so transformers'
`activation_checkpointing_enable` covers them. The encoder layers are left out there on purpose: each writes its
keys/values into the shared cache, and a replay in backward would append them a second time. Here each encoder
layer's forward runs under a non-reentrant `torch.utils.checkpoint` whose recompute sees the cache as it was just
before the layer ran (a shallow copy of its per-layer entries, swapped in for the replay and swapped back after), so
the replay computes the same keys/values and the live cache is written once. LoRA (peft) layers injected inside are
recomputed like any other module.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from dgtune.diffusion.model_calls import encoder_layers, unwrap
from dgtune.models.family import family_of


@contextmanager
def _cache_as(cache, layers_before: list):
    """Run the body with `cache.layers` = fresh shallow copies of `layers_before`; restore the live layers after."""
    live = cache.layers
    cache.layers = [copy.copy(layer) for layer in layers_before]
    try:
        yield
    finally:
        cache.layers = live


def _checkpointed_encoder_forward(layer, forward, hidden_states, *args, **kwargs):
    """An encoder layer's forward under checkpointing (training with gradients only); see the module docstring.
    The cache comes as `cache=` (transformers > 5.17) or `past_key_values=` (5.17)."""
    if not (layer.training and torch.is_grad_enabled()):
        return forward(hidden_states, *args, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return checkpoint(forward, hidden_states, *args, use_reentrant=False, **kwargs)
    before = [copy.copy(entry) for entry in cache.layers]  # layers' tensors are replaced on update, not mutated

    def contexts():
        return nullcontext(), _cache_as(cache, before)

    return checkpoint(forward, hidden_states, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint every layer of a (peft-wrapped or plain) model, non-reentrant: each layer keeps only its input and
    recomputes its activations in backward. The family's `encoder_layers` (DiffusionGemma: the encoder's, whose
    replay must see the cache as it was; one-stack families such as LLaDA and Dream: every layer of the stack) are
    wrapped here; where the profile says `hf_checkpointing`, transformers' own checkpointing covers the rest
    (DiffusionGemma's decoder layers). Takes effect in `model.train()` mode."""
    core = unwrap(model)
    if family_of(core).hf_checkpointing:
        if hasattr(core, "activation_checkpointing_enable"):  # decoder layers
            core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers 5.17's name
            core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in encoder_layers(core):
        if getattr(layer, "_dgtune_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed_encoder_forward, layer, layer.forward)
        layer._dgtune_checkpointed = True
