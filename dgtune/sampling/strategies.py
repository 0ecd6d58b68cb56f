"""Decoding strategies behind one step function (`strategy_step`), selected by `SamplerConfig.strategy`.

- `entropy_bound` (DiffusionGemma): accept the lowest-entropy sampled tokens while sum(H) - max(H) <= bound,
  renoise the rest; nothing stays committed; rows stop adaptively (stable argmax and mean entropy below a threshold).
- `topk_confidence` / `topk_margin` / `topk_entropy` / `topk_random` (LLaDA-style fixed schedule): commit
  k = ceil(uncommitted / steps left) uncommitted positions per step, by highest max-probability / largest top1-top2
  margin / lowest entropy / random order; all positions are committed after the last step.
- `threshold` (Fast-dLLM): commit every uncommitted position whose max-probability exceeds `threshold`, and at
  least the most confident one per step; a row stops when all its positions are committed.

Committed tokens never change. Uncommitted positions are renoised with uniform random tokens (`noise="uniform"`) or
set to [MASK] (`noise="mask"`). The output is the argmax canvas, with the committed tokens where committed.
"""

from __future__ import annotations

import torch

from dgtune.sampling import rng

TOPK = {"topk_confidence", "topk_margin", "topk_entropy", "topk_random"}
STRATEGIES = ("entropy_bound", *sorted(TOPK), "threshold")


def temperature(cur_step: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule; `cur_step` counts the steps remaining (max_steps .. 1). Computed in float32 exactly as
    transformers does, so that logits / temperature match bit for bit."""
    return t_min + ((t_max - t_min) * (torch.tensor(cur_step, dtype=torch.int32) / max_steps))


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the lowest-entropy positions while sum(entropies) - max(entropy) <= bound. [b, l] -> bool [b, l]"""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def check_strategy(cfg) -> None:
    """Raise a clear error for an unknown strategy / noise / commit setting."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown sampler strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if cfg.noise not in ("uniform", "mask"):
        raise ValueError(f"sampler noise must be 'uniform' or 'mask', got {cfg.noise!r}")
    if cfg.commit not in ("sample", "argmax"):
        raise ValueError(f"sampler commit must be 'sample' or 'argmax', got {cfg.commit!r}")


def noise_tokens(keys: torch.Tensor, shape, vocab_size: int, mask_id: int | None) -> torch.Tensor:
    """Renoise tokens [b, l]: [MASK] everywhere (mask_id set) or uniform ids from position keys [b, l]."""
    if mask_id is not None:
        return torch.full(shape, mask_id, dtype=torch.long, device=keys.device)
    return rng.randint(keys, vocab_size)


def topk_scores(strategy: str, stats, keys: torch.Tensor) -> torch.Tensor:
    """Higher = commit first. [b, l]"""
    if strategy == "topk_confidence":
        return stats.max_prob
    if strategy == "topk_margin":
        return stats.margin
    if strategy == "topk_entropy":
        return -stats.entropy
    return rng.uniform(keys)  # topk_random


def select_topk(scores: torch.Tensor, free: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[b] highest-scoring free positions per row (ties: lower position first). bool [b, l]"""
    scores = torch.where(free, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [b, l]
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)  # rank of every position
    return (rank < k[:, None]) & free


def select_threshold(max_prob: torch.Tensor, free: torch.Tensor, tau: float) -> torch.Tensor:
    """Free positions with max-prob > tau, plus the most confident free one. bool [b, l]"""
    masked = torch.where(free, max_prob, torch.full_like(max_prob, -1.0))
    best = torch.zeros_like(free).scatter_(-1, masked.argmax(-1, keepdim=True), True)
    return free & ((max_prob > tau) | best)


def strategy_step(cfg, stats, canvas: torch.Tensor, committed: torch.Tensor, steps_left: int, keys: dict,
                  vocab_size: int, mask_id: int | None, guide=None):
    """One step of `cfg.strategy`. stats: StepStats with [b, l] fields; canvas / committed [b, l]; keys: position
    keys [b, l] for "renoise" and "score". `guide(tokens [b, l], fixed [b, l]) -> reject [b, l]` (optional, a task's
    rule checker) vetoes newly accepted tokens that break a hard constraint: they are renoised (or stay
    uncommitted) instead of kept. Returns (next canvas [b, l], committed [b, l], output canvas [b, l])."""
    noise = noise_tokens(keys["renoise"], canvas.shape, vocab_size, mask_id)
    if cfg.strategy == "entropy_bound":
        accepted = entropy_bound_accept(stats.entropy, cfg.entropy_bound)
        if guide is not None:
            accepted = accepted & ~guide(stats.sample, accepted)
        return torch.where(accepted, stats.sample, noise), committed, stats.argmax
    free = ~committed
    if cfg.strategy == "threshold":
        new = select_threshold(stats.max_prob, free, cfg.threshold)
    else:
        k = (free.sum(-1) + steps_left - 1) // steps_left  # ceil(remaining / steps left) [b]
        new = select_topk(topk_scores(cfg.strategy, stats, keys["score"]), free, k)
    chosen = stats.sample if cfg.commit == "sample" else stats.argmax
    if guide is not None:
        new = new & ~guide(torch.where(committed, canvas, chosen), committed | new)
    committed = committed | new
    kept = torch.where(new, chosen, canvas)  # committed tokens (old ones are already in the canvas)
    return torch.where(committed, kept, noise), committed, torch.where(committed, kept, stats.argmax)
