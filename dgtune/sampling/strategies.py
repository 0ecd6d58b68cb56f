"""Decoding strategies behind one step function (`strategy_step`), selected by `SamplerConfig.strategy`.

- `entropy_bound` (DiffusionGemma): accept the lowest-entropy sampled tokens while sum(H) - max(H) <= bound,
  renoise the rest; nothing stays committed; rows stop adaptively (stable argmax and mean entropy below a threshold).
- `topk_confidence` / `topk_margin` / `topk_entropy` / `topk_random` (LLaDA-style fixed schedule): commit
  k uncommitted positions per step (`schedule`: "even", k = ceil(uncommitted / steps left), LLaDA's counts;
  "dream", Dream's), by highest max-probability / largest top1-top2 margin / lowest entropy / random order; all
  positions are committed after the last step.
- `threshold` (Fast-dLLM): commit every uncommitted position whose max-probability exceeds `threshold`, and at
  least the most confident one per step; a row stops when all its positions are committed.

Each strategy joins the `STRATEGIES` registry where it is defined (`@register_strategy(name)`), so a new one is
one function here (or in any module imported before sampling) plus one YAML in `configs/sampler/`.

Committed tokens never change. Uncommitted positions are renoised with uniform random tokens (`noise="uniform"`) or
set to [MASK] (`noise="mask"`). The output is the argmax canvas, with the committed tokens where committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dgtune.sampling import rng


@dataclass(frozen=True)
class Strategy:
    """How a strategy picks a step's positions: `select(cfg, stats, free [b, l], steps_left, score_keys) -> bool
    [b, l]`. `commits`: the chosen positions stay fixed for the rest of the canvas (top-k, threshold), or every
    step starts over from the sampled canvas (entropy_bound: the rest is renoised, nothing stays committed).
    `random_scores`: `select` reads per-position random numbers (`score_keys`, else None)."""

    select: Callable
    commits: bool = True
    random_scores: bool = False


STRATEGIES: dict[str, Strategy] = {}  # sampler.strategy -> Strategy


def register_strategy(name: str, commits: bool = True, random_scores: bool = False):
    """Decorator: `select` becomes strategy `name` (see `Strategy`)."""

    def deco(select: Callable) -> Callable:
        STRATEGIES[name] = Strategy(select, commits, random_scores)
        return select

    return deco


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
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown sampler schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if cfg.last_step not in ("argmax", "sample"):
        raise ValueError(f"sampler last_step must be 'argmax' or 'sample', got {cfg.last_step!r}")


def noise_tokens(keys: torch.Tensor, shape, vocab_size: int, mask_id: int | None) -> torch.Tensor:
    """Renoise tokens [b, l]: [MASK] everywhere (mask_id set) or uniform ids from position keys [b, l]."""
    if mask_id is not None:
        return torch.full(shape, mask_id, dtype=torch.long, device=keys.device)
    return rng.randint(keys, vocab_size)


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


@register_strategy("entropy_bound", commits=False)
def entropy_bound(cfg, stats, free, steps_left, score_keys):
    """DiffusionGemma's rule: the lowest-entropy sampled tokens while sum(H) - max(H) <= `entropy_bound`."""
    return entropy_bound_accept(stats.entropy, cfg.entropy_bound)


SCHEDULES: dict[str, Callable] = {}  # sampler.schedule -> (remaining [b], steps_left, max_steps) -> k [b]


def even_schedule(remaining: torch.Tensor, steps_left: int, max_steps: int) -> torch.Tensor:
    """k = ceil(remaining / steps left): the same counts as LLaDA's `get_num_transfer_tokens` (n // steps each, the
    remainder one each to the first steps)."""
    return (remaining + steps_left - 1) // steps_left


DREAM_EPS = 1e-3  # Dream's generation_config.eps: its timesteps run linspace(1, eps, steps + 1)


def dream_schedule(remaining: torch.Tensor, steps_left: int, max_steps: int) -> torch.Tensor:
    """Dream's counts (`generation_utils.py` `_sample`): at step i, with t, s = timesteps i and i + 1 of
    linspace(1, 1e-3, steps + 1) in float32, k = int(remaining * (1 - s / t)); the last step takes the rest.
    (Dream counts the batch's mean of masked positions; per row here, the same where rows start alike.)"""
    if steps_left == 1:
        return remaining
    ts = torch.linspace(1, DREAM_EPS, max_steps + 1)  # float32, as Dream's
    i = max_steps - steps_left
    return (remaining.float() * (1 - ts[i + 1] / ts[i]).to(remaining.device)).long()


SCHEDULES.update(even=even_schedule, dream=dream_schedule)


def _topk(score: Callable):
    """A fixed-schedule strategy: commit k free positions (`sampler.schedule`: even = ceil(uncommitted / steps
    left), dream = Dream's), highest `score` first."""

    def select(cfg, stats, free, steps_left, score_keys):
        k = SCHEDULES[cfg.schedule](free.sum(-1), steps_left, cfg.max_steps)  # [b]
        return select_topk(score(stats, score_keys), free, k)

    return select


register_strategy("topk_confidence")(_topk(lambda stats, keys: stats.max_prob))
register_strategy("topk_entropy")(_topk(lambda stats, keys: -stats.entropy))
register_strategy("topk_margin")(_topk(lambda stats, keys: stats.margin))
register_strategy("topk_random", random_scores=True)(_topk(lambda stats, keys: rng.uniform(keys)))


@register_strategy("threshold")
def threshold(cfg, stats, free, steps_left, score_keys):
    """Fast-dLLM: every free position with max-prob > `threshold`, and at least the most confident one."""
    return select_threshold(stats.max_prob, free, cfg.threshold)


def block_window(free: torch.Tensor, steps_left: int, cfg) -> tuple[torch.Tensor, int]:
    """LLaDA's semi-autoregressive blocks (`sampler.block_length` > 0 on a one-stack family; ML-GSAI/LLaDA
    `generate.py`): the canvas is cut into blocks of `block_length`, each given an equal share of `max_steps`, and a
    step commits only inside the current block (`generate.py` sets the confidence after it to -inf). Returns (the
    free positions up to the current block's end [b, l], the steps left in the block)."""
    l, block = free.shape[1], cfg.block_length
    if l % block or cfg.max_steps % (l // block):
        raise ValueError(f"sampler.block_length={block}: the canvas ({l} tokens) must hold whole blocks and the "
                         f"steps ({cfg.max_steps}) must split evenly over its {l / block:g} blocks (as LLaDA's "
                         "generate.py asserts)")
    per_block = cfg.max_steps // (l // block)
    step = cfg.max_steps - steps_left  # 0-based
    end = (step // per_block + 1) * block
    inside = torch.arange(l, device=free.device)[None, :] < end  # [1, l]
    return free & inside, per_block - step % per_block


def strategy_step(cfg, stats, canvas: torch.Tensor, committed: torch.Tensor, steps_left: int, keys: dict,
                  vocab_size: int, mask_id: int | None, guide=None):
    """One step of `cfg.strategy`. stats: StepStats with [b, l] fields; canvas / committed [b, l]; keys: position
    keys [b, l] for "renoise" and "score". `guide(tokens [b, l], fixed [b, l]) -> reject [b, l]` (optional, a task's
    rule checker) vetoes newly accepted tokens that break a hard constraint: they are renoised (or stay
    uncommitted) instead of kept. Returns (next canvas [b, l], committed [b, l], output canvas [b, l], drawn [b, l]
    bool: the positions whose sampled token this step keeps in the next canvas, the step's random decisions that
    depend on the model, read by the trajectory likelihood of `method=rl`)."""
    strategy = STRATEGIES[cfg.strategy]
    noise = noise_tokens(keys["renoise"], canvas.shape, vocab_size, mask_id)
    free = ~committed
    if strategy.commits and cfg.block_length:  # semi-autoregressive: commit inside the current block only
        free, steps_left = block_window(free, steps_left, cfg)
    if not strategy.commits:
        accepted = strategy.select(cfg, stats, free, steps_left, keys.get("score"))
        if guide is not None:
            accepted = accepted & ~guide(stats.sample, accepted)
        return torch.where(accepted, stats.sample, noise), committed, stats.argmax, accepted
    new = strategy.select(cfg, stats, free, steps_left, keys.get("score"))
    chosen = stats.sample if cfg.commit == "sample" else stats.argmax
    if guide is not None:
        new = new & ~guide(torch.where(committed, canvas, chosen), committed | new)
    committed = committed | new
    kept = torch.where(new, chosen, canvas)  # committed tokens (old ones are already in the canvas)
    drawn = new if cfg.commit == "sample" else torch.zeros_like(new)
    return torch.where(committed, kept, noise), committed, torch.where(committed, kept, stats.argmax), drawn
