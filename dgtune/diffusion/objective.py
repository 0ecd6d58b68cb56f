"""DiffusionGemma's block-diffusion SFT objective (and its masked-diffusion sibling) as pure functions.

One training example = a clean prompt (never corrupted, never in the diffusion loss) and one canvas of
`canvas_length` response tokens, EOS-filled past the end of the response. The canvas is corrupted with
per-example noise level t ~ U(eps, 1 - eps) (`t_power` != 1: t = eps + (1 - 2 eps) u^t_power):

- "uniform" (released DiffusionGemma recipe): each position is replaced by a uniformly random token with
  probability t; flat mean cross-entropy over the whole canvas.
  With `prediction="mean_loo"` the decoder's output is read as the leave-one-out posterior pi_i (each clean
  token predicted without its own noisy observation y_i, Gourevitch et al. 2026, arXiv 2605.22765, TRL's
  `model_prediction_type=mean_loo`); the loss is the cross-entropy of the denoising posterior it implies,
  p(x0_i = x | x_t) ∝ pi_i(x) q(y_i | x) with q(y | x) = (1 - t) 1[x = y] + t / V.
- "masked" (LLaDA/MDLM-style): each position is replaced by [MASK] with probability t; cross-entropy on the
  masked positions only, weighted by 1/max(t, t_min_weight), averaged over each example's free positions, then
  over examples.

Self-conditioning: with probability `self_cond_p` per example the decoder is conditioned on the logits of a
first, no-grad pass. The encoder (which reads the whole clean sequence) adds an autoregressive co-loss.
All randomness comes from an explicit `torch.Generator`, drawn in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class ObjectiveConfig:
    """Knobs of the denoising objective (mirrors `configs/objective/*.yaml`)."""

    kind: str = "uniform"  # "uniform" | "masked"
    prediction: str = "denoiser"  # uniform noise: "denoiser" (released) | "mean_loo" (leave-one-out posterior)
    eps: float = 1e-4
    self_cond_p: float = 0.5
    ar_weight: float = 1.0
    t_power: float = 1.0  # t = eps + (1 - 2 eps) u^t_power: 1 is the released U(eps, 1 - eps); < 1 favours high noise
    # > 0: the self-conditioning pass sees a noisier canvas, at level min(t + gap, 1 - eps), as when sampling (where
    # the previous step's logits came from the previous, noisier canvas); 0 = the same canvas (released)
    sc_noise_gap: float = 0.0
    t_min_weight: float = 1e-3  # masked: the 1/t loss weight uses max(t, t_min_weight) (LLaDA-style floor)
    # memory, not maths: > 0 computes the cross-entropies from hidden states and the LM-head weight this many tokens
    # at a time (`dgtune.diffusion.chunked`, no [b, l, v] float32 logits); 0 = full logits (same values, gradients)
    loss_chunk: int = 0
    # > 0: add this weight times the task's auxiliary loss on the canvas distribution (e.g. Sudoku's unit
    # constraint, `SudokuTask.aux_loss`); the task must define `aux_token_ids` and `aux_loss`
    aux_weight: float = 0.0


def sample_noise_level(
    batch_size: int, eps: float, generator: torch.Generator, device="cpu", power: float = 1.0
) -> torch.Tensor:
    """Per-example noise level t = eps + (1 - 2 eps) u^power, u ~ U(0, 1); power 1 is t ~ U(eps, 1 - eps).  # [b]"""
    if power <= 0:
        raise ValueError(f"objective.t_power={power}: must be > 0 (1 = uniform noise levels, < 1 favours high noise)")
    u = torch.rand(batch_size, generator=generator, device=device)
    return eps + (1.0 - 2.0 * eps) * u**power


def corrupt_uniform(
    clean: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each position by a uniform random token with probability t (per row).

    clean: [b, l] token ids; t: [b]; keep: optional [b, l] bool of positions never corrupted (templates).
    Returns (noisy [b, l], corrupted [b, l] bool).
    """
    b, l = clean.shape
    corrupted = torch.rand(b, l, generator=generator, device=clean.device) < t[:, None]  # [b, l]
    random_tokens = torch.randint(0, vocab_size, (b, l), generator=generator, device=clean.device)  # [b, l]
    if keep is not None:
        corrupted = corrupted & ~keep
    return torch.where(corrupted, random_tokens, clean), corrupted


def corrupt_further(
    noisy: torch.Tensor, corrupted: torch.Tensor, t: torch.Tensor, t_more: torch.Tensor, replacement: torch.Tensor,
    generator: torch.Generator, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisier copy of a canvas corrupted at level t: each clean position (not `keep`) is also corrupted with
    probability (t_more - t) / (1 - t), so every position is corrupted with probability t_more overall.

    noisy, corrupted: [b, l] from `corrupt_uniform` / `corrupt_masked`; t, t_more: [b] (t_more >= t);
    replacement: [b, l] tokens for newly corrupted positions (random ids, or the [MASK] id).
    Returns (noisier [b, l], corrupted_more [b, l] bool, a superset of `corrupted`)."""
    b, l = noisy.shape
    p = ((t_more - t) / (1.0 - t).clamp_min(1e-6)).clamp(0.0, 1.0)  # [b]
    extra = (torch.rand(b, l, generator=generator, device=noisy.device) < p[:, None]) & ~corrupted  # [b, l]
    if keep is not None:
        extra = extra & ~keep
    return torch.where(extra, replacement, noisy), corrupted | extra


def corrupt_masked(
    clean: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each position by `mask_id` with probability t (per row). Same shapes as `corrupt_uniform`."""
    b, l = clean.shape
    corrupted = torch.rand(b, l, generator=generator, device=clean.device) < t[:, None]  # [b, l]
    if keep is not None:
        corrupted = corrupted & ~keep
    return torch.where(corrupted, torch.full_like(clean, mask_id), clean), corrupted


def loo_log_likelihoods(t: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log q(y | x) of uniform noise at level t [b]: (log_other [b] for y != x, log_same [b] for y == x)."""
    log_other = torch.log(t / vocab_size)  # y != x: only a random draw that landed on y
    log_same = torch.log((1 - t) + t / vocab_size)  # y == x: kept, or redrawn as itself
    return log_other, log_same


def loo_to_denoiser_logits(loo_logits: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unnormalised log denoising posterior from leave-one-out logits, under uniform noise at level t.

    log p(x0 = x | x_t) = loo_logits[x] + log q(y | x) + const, q(y | x) = (1 - t) 1[x = y] + t / V.
    loo_logits [b, l, v] (float), noisy [b, l] (the observed tokens y), t [b]. Returns [b, l, v].
    """
    v = loo_logits.shape[-1]
    log_other, log_same = loo_log_likelihoods(t.to(loo_logits.dtype), v)  # [b], [b]
    observed = F.one_hot(noisy, v).bool()  # [b, l, v]
    return loo_logits + torch.where(observed, log_same[:, None, None], log_other[:, None, None])


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final-logit soft-capping, in float32."""
    logits = logits.float()
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def flat_token_weights(target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position weights [b, l] of the flat canvas loss (its value is sum(w * ce)): 1 / (b l), or the
    normalised `weight` [b, l] (0 = ignore)."""
    if weight is None:
        return torch.full(target.shape, 1.0 / target.numel(), device=target.device)
    return weight / weight.sum().clamp(min=1.0)


def masked_token_weights(
    target: torch.Tensor, corrupted: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, t_min: float = 1e-3
) -> torch.Tensor:
    """Per-position weights [b, l] of the MDLM/LLaDA loss (its value is sum(w * ce)): 1 / max(t, t_min) on masked
    positions, divided by the example's number of free positions (`weight` [b, l], 0 = template, never predicted)
    and by the batch size, i.e. each example's mean over its free positions, then the mean over examples (as
    LLaDA's SFT divides by each answer's length). The floor keeps the weight <= 1 / t_min (at t = eps = 1e-4 it
    would be 1e4); without a template this is 1 / (t b l)."""
    b = target.shape[0]
    free = torch.ones(target.shape, device=target.device) if weight is None else weight.float()  # [b, l]
    w = corrupted.float() / t.clamp(min=t_min)[:, None]  # [b, l]
    return w * free / (free.sum(-1, keepdim=True).clamp(min=1.0) * b)


def flat_canvas_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over every canvas position. logits [b, l, v], target [b, l], weight [b, l] (0 = ignore)."""
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)  # [b, l]
    return (ce * flat_token_weights(target, weight)).sum()


def masked_canvas_loss(
    logits: torch.Tensor, target: torch.Tensor, corrupted: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None,
    t_min: float = 1e-3,
) -> torch.Tensor:
    """MDLM/LLaDA loss: CE on masked positions weighted 1 / max(t, t_min), summed per example over its free
    positions (`weight` [b, l], 0 = template, never predicted) and divided by their number, then averaged over
    examples (as LLaDA's SFT divides by each answer's length). The floor keeps the weight <= 1 / t_min (at
    t = eps = 1e-4 it would be 1e4); without a template this is the sum over the batch / (b * l)."""
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)  # [b, l]
    return (ce * masked_token_weights(target, corrupted, t, weight, t_min)).sum()


@dataclass(frozen=True)
class Noise:
    """One corruption kind of the objective (`objective.kind`), all the loss needs to know of it:
    `corrupt(clean [b, l], t [b], vocab_size, mask_id, generator, keep) -> (noisy [b, l], corrupted [b, l] bool)`,
    or `(noisy, corrupted, t)` for a law that redraws some rows' levels (SDAR's: the weights then read the new t);
    `replacement(clean, vocab_size, mask_id, generator) -> [b, l]` the tokens a further corruption writes (the
    self-conditioning pass with `sc_noise_gap`); `token_weights(clean, corrupted, t, weight, cfg) -> [b, l]` the
    per-position weights of the canvas cross-entropy (the loss is their weighted sum; `weight` [b, l]: 0 = template
    position); `predictions`: the decoder outputs it supports ("mean_loo" reads the output as a leave-one-out
    posterior and needs uniform noise); `absorbing`: it corrupts to [MASK] (what the RL likelihood estimates of
    `dgtune.rl.likelihood` corrupt with, at their own levels)."""

    corrupt: Callable
    replacement: Callable
    token_weights: Callable
    predictions: tuple[str, ...] = ("denoiser",)
    absorbing: bool = True


NOISES: dict[str, Noise] = {}  # objective.kind -> Noise


def register_noise(name: str, noise: Noise) -> Noise:
    """Add `noise` as `objective.kind=name`; returns it."""
    NOISES[name] = noise
    return noise


def _need_mask(mask_id: int | None) -> int:
    if mask_id is None:
        raise ValueError("objective.kind=masked needs a tokenizer with a mask token")
    return mask_id


register_noise("uniform", Noise(  # the released DiffusionGemma recipe
    corrupt=lambda clean, t, vocab, mask_id, gen, keep: corrupt_uniform(clean, t, vocab, gen, keep),
    replacement=lambda clean, vocab, mask_id, gen: torch.randint(0, vocab, clean.shape, generator=gen,
                                                                 device=clean.device),
    token_weights=lambda clean, corrupted, t, weight, cfg: flat_token_weights(clean, weight),
    predictions=("denoiser", "mean_loo"),
    absorbing=False,
))
register_noise("masked", Noise(  # LLaDA / MDLM
    corrupt=lambda clean, t, vocab, mask_id, gen, keep: corrupt_masked(clean, t, _need_mask(mask_id), gen, keep),
    replacement=lambda clean, vocab, mask_id, gen: torch.full_like(clean, _need_mask(mask_id)),
    token_weights=lambda clean, corrupted, t, weight, cfg: masked_token_weights(clean, corrupted, t, weight,
                                                                                 cfg.t_min_weight),
))


LLADA_EPS = 1e-3  # ML-GSAI/LLaDA GUIDELINES.md: p_mask = (1 - eps) t + eps


def llada_mask_rate(t: torch.Tensor) -> torch.Tensor:
    """LLaDA's masking probability p = (1 - 1e-3) t + 1e-3 of a noise level t [b] (with `objective.eps=0`,
    dgtune's t is LLaDA's t ~ U(0, 1))."""
    return (1 - LLADA_EPS) * t + LLADA_EPS


def llada_token_weights(corrupted: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-position weights [b, l] of LLaDA's SFT loss: 1 / p on the masked positions, divided by each row's answer
    length (its free canvas positions, EOS padding included: `weight` [b, l], 0 = template) and by the batch size."""
    b = corrupted.shape[0]
    free = torch.ones(corrupted.shape, device=corrupted.device) if weight is None else weight.float()  # [b, l]
    w = corrupted.float() / llada_mask_rate(t)[:, None]
    return w * free / (free.sum(-1, keepdim=True).clamp(min=1.0) * b)


register_noise("llada", Noise(  # LLaDA's own law (GUIDELINES.md, SFT): mask rate (1 - 1e-3) t + 1e-3, weight 1 / p
    corrupt=lambda clean, t, vocab, mask_id, gen, keep: corrupt_masked(clean, llada_mask_rate(t), _need_mask(mask_id),
                                                                       gen, keep),
    replacement=lambda clean, vocab, mask_id, gen: torch.full_like(clean, _need_mask(mask_id)),
    token_weights=lambda clean, corrupted, t, weight, cfg: llada_token_weights(corrupted, t, weight),
))


def dream_token_weights(corrupted: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-position weights [b, l] of Dream's SFT loss: 1 / t on the masked positions (t ~ U(0, 1), the mask rate
    itself), divided by the number of masked positions in the batch (DreamLM/DreamOn
    `src/trainer/fsdp_sft_expand_trainer.py`, `time_reweighting=original`: `1 / t`, then the sum over the loss mask
    / its count). A row drawn at t = 0 has no masked position and weight 0."""
    w = torch.where(corrupted, 1.0 / t[:, None], torch.zeros((), device=t.device))  # [b, l]
    return w / corrupted.sum().clamp(min=1)


register_noise("dream", Noise(  # Dream's law: mask rate t ~ U(0, 1), weight 1 / t, / the batch's masked count
    corrupt=lambda clean, t, vocab, mask_id, gen, keep: corrupt_masked(clean, t, _need_mask(mask_id), gen, keep),
    replacement=lambda clean, vocab, mask_id, gen: torch.full_like(clean, _need_mask(mask_id)),
    token_weights=lambda clean, corrupted, t, weight, cfg: dream_token_weights(corrupted, t),
))


LLADA2_RANGE = (0.3, 0.8)  # dFactory configs/sft/llada2_mini_bd_sft.yaml: noise_range_low / noise_range_high


def llada2_token_weights(corrupted: torch.Tensor) -> torch.Tensor:
    """Per-position weights [b, l] of LLaDA2's block-diffusion SFT loss (dFactory `tasks/train_llada2_bd.py`,
    `same_token_labels`, with its shipped micro-batches of one answer): 1 on the masked positions, / the answer's
    masked count, / the batch size (no 1 / t). An answer with nothing masked adds 0 (dFactory's would be 0 / 0)."""
    c = corrupted.float()
    return c / (c.sum(-1, keepdim=True).clamp(min=1) * c.shape[0])


register_noise("llada2", Noise(  # LLaDA2's law: mask rate p ~ U(0.3, 0.8) (p = 0.3 + 0.5 t), / each masked count
    corrupt=lambda clean, t, vocab, mask_id, gen, keep: corrupt_masked(
        clean, LLADA2_RANGE[0] + (LLADA2_RANGE[1] - LLADA2_RANGE[0]) * t, _need_mask(mask_id), gen, keep),
    replacement=lambda clean, vocab, mask_id, gen: torch.full_like(clean, _need_mask(mask_id)),
    token_weights=lambda clean, corrupted, t, weight, cfg: llada2_token_weights(corrupted),
))


SDAR_TRIES = 10  # JetAstra/SDAR modeling_sdar.py forward_add_noise_packed(max_tries=10)


def corrupt_sdar(clean: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator,
                 keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDAR's corruption (JetAstra/SDAR `training/model/SDAR-4B-Chat/modeling_sdar.py`, `forward_add_noise_packed`,
    one answer per row): each free position (not `keep`) becomes [MASK] with probability p = (1 - 1e-3) t + 1e-3; a
    row with nothing masked draws a new level and mask, up to 10 tries in all, and after that has one free position,
    chosen uniformly, masked. Every retry draws u [b] then [b, l] for the whole batch (a row reads them only while it
    is empty), so a row's outcome does not depend on the other rows. (noisy [b, l], corrupted [b, l], t [b]: each
    row's level of its last try)."""
    b, l = clean.shape
    free = torch.ones_like(clean, dtype=torch.bool) if keep is None else ~keep  # [b, l]
    corrupted = (torch.rand(b, l, generator=generator, device=clean.device) < llada_mask_rate(t)[:, None]) & free
    for _ in range(SDAR_TRIES - 1):
        empty = ~corrupted.any(-1) & free.any(-1)  # [b]
        if not bool(empty.any()):
            break
        t_new = torch.rand(b, generator=generator, device=clean.device)  # [b]
        redrawn = (torch.rand(b, l, generator=generator, device=clean.device) < llada_mask_rate(t_new)[:, None]) & free
        t = torch.where(empty, t_new, t)
        corrupted = torch.where(empty[:, None], redrawn, corrupted)
    empty = ~corrupted.any(-1) & free.any(-1)
    if bool(empty.any()):  # 10 empty tries: one free position, uniformly (SDAR: randint over the eligible ones)
        r = torch.rand(b, generator=generator, device=clean.device)  # [b]
        k = (r * free.sum(-1)).long()  # [b] the k-th free position
        pick = free & (free.long().cumsum(-1) == (k + 1)[:, None])  # [b, l]
        corrupted = torch.where(empty[:, None], pick, corrupted)
    return torch.where(corrupted, torch.full_like(clean, mask_id), clean), corrupted, t


def sdar_token_weights(corrupted: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-position weights [b, l] of SDAR's SFT loss (`SDARForCausalLM.forward`, training branch): 1 / p on the
    masked positions (`FusedLinearDiffusionCrossEntropyLoss` divides by `p_mask`, reduction sum), divided by the
    answer tokens of the whole batch (`answer_len = (labels != -100).sum()`: the free positions, EOS padding
    included)."""
    free = torch.ones(corrupted.shape, device=corrupted.device) if weight is None else weight.float()  # [b, l]
    return corrupted.float() / llada_mask_rate(t)[:, None] * free / free.sum().clamp(min=1.0)


register_noise("sdar", Noise(  # SDAR's law: p = (1 - 1e-3) t + 1e-3, redrawn until something is masked, 1 / p
    corrupt=lambda clean, t, vocab, mask_id, gen, keep: corrupt_sdar(clean, t, _need_mask(mask_id), gen, keep),
    replacement=lambda clean, vocab, mask_id, gen: torch.full_like(clean, _need_mask(mask_id)),
    token_weights=lambda clean, corrupted, t, weight, cfg: sdar_token_weights(corrupted, t, weight),
))


def noise_for(cfg: ObjectiveConfig) -> Noise:
    """The `Noise` of `cfg.kind`, checked against `cfg.prediction` (a clear error naming both)."""
    if cfg.kind not in NOISES:
        raise ValueError(f"unknown objective.kind={cfg.kind!r} (expected one of {', '.join(NOISES)})")
    noise = NOISES[cfg.kind]
    if cfg.prediction not in noise.predictions:
        raise ValueError(f"objective.prediction={cfg.prediction!r} with kind={cfg.kind!r}: expected one of "
                         f"{', '.join(noise.predictions)} (for [MASK] noise a leave-one-out output and a denoiser coincide)")
    return noise


def canvas_cross_entropy(logits: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """The canvas loss from full logits: sum over positions of `token_weight` [b, l] x cross-entropy (logits
    [b, l, v], target [b, l])."""
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)  # [b, l]
    return (ce * token_weight).sum()


def ar_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets of the encoder's AR co-loss: (input_ids[:, 1:] [b, s-1], valid [b, s-1] bool: both the
    token and its successor are real)."""
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # [b, s-1]
    return input_ids[:, 1:], valid


def ar_co_loss(encoder_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pairs: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy of the causal encoder summed over all valid (token, next token) pairs / `pairs`
    (default: their number here, the mean; a process' rows of a larger batch pass the batch's count).

    encoder_logits [b, s, v], input_ids [b, s], attention_mask [b, s].
    """
    next_ids, valid = ar_targets(input_ids, attention_mask)  # [b, s-1], [b, s-1]
    targets = torch.where(valid, next_ids, -100)
    logits = encoder_logits[:, :-1].flatten(0, 1)
    if pairs is None:
        return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
    total = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(pairs, device=total.device).clamp(min=1)
