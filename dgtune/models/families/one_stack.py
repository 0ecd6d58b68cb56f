"""The model calls shared by the families that run one bidirectional stack over each row's [prompt ; canvas]
(LLaDA, Dream): no encoder/decoder split and no KV cache that the answer reads.

`encode` keeps the prompt ids as the "cache"; every denoising pass lays each row out contiguously, as these
families read a sequence in training and in their own samplers: the row's p prompt tokens, then its canvas at
positions p .. p + l - 1, then padding (masked out as keys). `canvas_hidden` returns the final-normed hidden states
that predict the canvas: with `shift=0` position i's own (LLaDA), with `shift=1` position i - 1's (Dream, adapted
from an autoregressive model: its logits are shifted right by one, so the last prompt token predicts the first
answer token). A family module imports what it shares from here and defines its own `decode_hidden`, head and
embedding calls (`dgtune.diffusion.model_calls` looks them up on the family's `calls` module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PromptCache:
    """What `encode` keeps of a prompt batch: ids [b, s] and attention mask [b, s] (right-padded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def get_seq_length(self) -> int:
        """The prompt columns."""
        return self.input_ids.shape[1]

    def select_rows(self, idx: torch.Tensor) -> "PromptCache":
        """The rows `idx` (the fast sampler retires finished rows)."""
        return PromptCache(self.input_ids.index_select(0, idx), self.attention_mask.index_select(0, idx))


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, position_ids=None):
    """(PromptCache, None): these families have no separate encoder pass; the prompt is read again with each
    canvas. With `cache` (an answer of several canvases), `input_ids` [b, n] (a finished canvas) is appended to
    each row's tokens, right after its real ones."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cache is not None:
        ids = torch.cat([cache.input_ids, input_ids], dim=1)
        mask = torch.cat([cache.attention_mask, attention_mask], dim=1)
        order = torch.argsort((mask == 0).int(), dim=1, stable=True)  # each row's real tokens first, in order
        input_ids, attention_mask = ids.gather(1, order), mask.gather(1, order)
    return PromptCache(input_ids, attention_mask), None


def training_cache(model):
    """None: nothing to prepare."""
    return None


def decoder_context(model, cache: PromptCache, prompt_len: torch.Tensor, canvas_length: int):
    """(cache, attention mask [b, s + l]): each row's prompt tokens and the whole canvas."""
    s = cache.get_seq_length()
    cols = torch.arange(s, device=prompt_len.device)[None, :] < prompt_len[:, None]  # [b, s]
    canvas = torch.ones(prompt_len.shape[0], canvas_length, dtype=torch.bool, device=prompt_len.device)
    return cache, torch.cat([cols, canvas], dim=1).long()


def canvas_hidden(final_hidden: Callable, canvas: torch.Tensor, cache: PromptCache, shift: int = 0) -> torch.Tensor:
    """The hidden states [b, l, d] that predict canvas [b, l]: `final_hidden(x [b, s + l], mask [b, s + l])` runs
    the stack over each row's [prompt ; canvas ; padding] (mask: 1 on the row's p + l real tokens) and returns
    final-normed states [b, s + l, d]; canvas position j reads the state at p + j - shift (never before 0: with an
    empty prompt the first position reads its own, as Dream's samplers do)."""
    b, l = canvas.shape
    prompt, prompt_mask = cache.input_ids, cache.attention_mask
    if prompt.shape[0] != b:  # one prompt batch for several canvases of the same rows
        prompt, prompt_mask = prompt.expand(b, -1), prompt_mask.expand(b, -1)
    s = prompt.shape[1]
    p = prompt_mask.sum(-1)  # [b] prompt lengths
    cols = p[:, None] + torch.arange(l, device=canvas.device)[None, :]  # [b, l] the canvas' positions
    x = torch.cat([prompt * prompt_mask, torch.zeros_like(canvas)], dim=1)  # [b, s + l]
    x = x.scatter(1, cols, canvas)
    mask = (torch.arange(s + l, device=canvas.device)[None, :] < (p + l)[:, None]).long()  # [b, s + l]
    hidden = final_hidden(x, mask)  # [b, s + l, d]
    read = (cols - shift).clamp(min=0)  # [b, l]
    return hidden.gather(1, read[..., None].expand(-1, -1, hidden.shape[-1]))


def no_self_conditioning(family: str, objective: str) -> ValueError:
    """The error for a self-conditioning input to a family that has none."""
    return ValueError(f"the {family} family has no self-conditioning: use objective.self_cond_p=0 "
                      f"(objective={objective})")


def has_sliding_layers(model) -> bool:
    """No sliding-window layers."""
    return False

