"""Log-likelihood estimates of a completion under a diffusion LM, for RL (`method=rl`, `method.estimator`).

An autoregressive policy's log pi(o | q) is a sum of next-token log-probabilities; a diffusion model has no
tractable likelihood, and how it is estimated is where diffusion RL methods differ. Both estimators here return
per-position terms `logp` [b, l] of the completion canvas o (EOS-filled, as in SFT) and the positions that count
`free` [b, l] (not given by a canvas template); the sequence estimate is their mean over the free positions
(`sequence_logp`). Every random draw is a counter-based hash of (row seed, draw, purpose, position)
(`dgtune.sampling.rng`), so a row's estimate does not depend on the other rows of its batch (2 processes = 1) and
the current, old and reference policies are compared on the same noise (coupled draws: the seeds are the row's).

- `one_pass` (d1's mean-field estimate, arXiv 2504.12216, carried over to DiffusionGemma): the completion fully
  noised (t = 1 - eps: uniform random tokens for `objective.kind=uniform`, all [MASK] for `masked`), each prompt
  token perturbed with probability `prompt_noise` by the same kind of noise, one decoder pass:
  logp_i = log p_theta(x_i = o_i | noisy canvas, perturbed prompt), the product of the fully noised canvas'
  per-position marginals. With `prediction=mean_loo` the decoder output is first converted to the denoiser
  posterior at the canvas' noise level (`loo_to_denoiser_logits`). `draws` > 1 averages independent perturbations.
- `elbo` (the denoising loss as an ELBO-style bound, as LLaDA 1.5's VRPO and SPG use): at K = `draws` noise levels
  stratified over (eps, 1 - eps), t_k = eps + (1 - 2 eps) (k + u) / K with one u per row, the canvas corrupted at
  t_k and logp_i = w_i(t_k) log p_theta(x_i = o_i | x_{t_k}), averaged over k, where w is the objective's weight
  (uniform noise: 1 on every position, as the released flat loss; masked: 1 / max(t, t_min_weight) on the masked
  positions, 0 on the others, so E_t[.] is the MDLM bound per position). Stratifying the levels removes most of the
  variance that K independent levels would have.

No self-conditioning pass in these two: each estimate is the decoder's first pass (as the first sampling step).

- `trajectory` (the sampler's own policy, as TraceRL, arXiv 2509.06949, scores the decoding trace): the rollout's
  sampler records each step's input canvas c_k, temperature T_k and the draws it kept (`Trace`, from the fast
  sampler's `TraceStep`s); the estimate replays the steps with gradient, self-conditioning included, and returns
  logp_{k,i} = log softmax(f_theta(c_k, q) / T_k)_{x_{k,i}} at the kept draws, so sum_{k,i} logp_{k,i} is the exact
  log-probability of those draws under the current weights. Its gradient is the policy gradient of the sampler
  *at the step count and temperatures of the rollouts* (the choice of which draws to keep, e.g. entropy_bound's
  acceptance, is treated as given). With `sampler.last_step=argmax` the output of the last step is not a draw and
  counts nothing; `method=rl` rolls out with `last_step=sample`. No noise of its own: `draws` is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgtune.diffusion.model_calls import (block_diffusion, decode_hidden, decoder_context, embedding_dtype, encode,
                                         lm_logits, training_cache)
from dgtune.diffusion.objective import NOISES, loo_to_denoiser_logits
from dgtune.sampling import rng

NOISE_DRAW, TOKEN_DRAW, LEVEL_DRAW, PROMPT_DRAW, PROMPT_TOKEN_DRAW = 11, 12, 13, 14, 15  # rng purposes


@dataclass
class Trace:
    """The fast sampler's steps of a batch of completions (`from_steps`), as the `trajectory` estimator replays them.

    canvas / tokens / drawn [k, b, l]: each step's input canvas, drawn tokens and kept draws (False for rows that
    had stopped); temperatures [k]; noise_level [k, b] (prediction="mean_loo") or None; mask_id: the sampler's [MASK]
    (never predicted) or None; self_conditioning: each step read the previous step's logits / temperature."""

    canvas: torch.Tensor
    tokens: torch.Tensor
    drawn: torch.Tensor
    temperatures: list
    noise_level: torch.Tensor | None
    mask_id: int | None
    self_conditioning: bool

    @classmethod
    def from_steps(cls, parts: list, b: int, l: int, cfg, mask_id: int | None) -> "Trace":
        """One Trace of b rows from `parts`: (row indices [n] of the batch, that call's `TraceStep` list), one per
        sampler call (prompts are sampled in groups of equal length); every call ran the same steps' schedule."""
        k = max(len(steps) for _, steps in parts)
        canvas = torch.zeros(k, b, l, dtype=torch.long)
        tokens = torch.zeros(k, b, l, dtype=torch.long)
        drawn = torch.zeros(k, b, l, dtype=torch.bool)
        level = torch.ones(k, b) if cfg.prediction == "mean_loo" else None
        temps = [1.0] * k
        for idx, steps in parts:
            for j, st in enumerate(steps):
                rows = idx[st.rows.cpu()]  # the batch's rows this step ran on
                canvas[j, rows], tokens[j, rows], drawn[j, rows] = st.canvas.cpu(), st.tokens.cpu(), st.drawn.cpu()
                temps[j] = st.temperature
                if level is not None:
                    level[j, rows] = st.noise_level.float().cpu()
        return cls(canvas, tokens, drawn, temps, level, mask_id, bool(cfg.self_conditioning))

    def to(self, device) -> "Trace":
        """The trace's tensors on `device`."""
        return Trace(self.canvas.to(device), self.tokens.to(device), self.drawn.to(device), self.temperatures,
                     None if self.noise_level is None else self.noise_level.to(device), self.mask_id,
                     self.self_conditioning)

    def rows(self, idx) -> "Trace":
        """The rows `idx` of every step."""
        return Trace(self.canvas[:, idx], self.tokens[:, idx], self.drawn[:, idx], self.temperatures,
                     None if self.noise_level is None else self.noise_level[:, idx], self.mask_id,
                     self.self_conditioning)


@dataclass
class Completions:
    """Prompts and completions as the estimators read them (one row per completion).

    input_ids / attention_mask [b, s]: the prompts, right-padded; prompt_len [b]; canvas [b, l]: the completion
    (EOS-filled); keep [b, l] bool or None: canvas-template positions (given, never noised, not counted); seeds [b]:
    one integer per row, the base of every draw an estimate makes for it; trace: the sampler's steps that drew them
    (the `trajectory` estimator) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: torch.Tensor
    canvas: torch.Tensor
    keep: torch.Tensor | None
    seeds: torch.Tensor
    trace: Trace | None = None

    def rows(self, idx) -> "Completions":
        """The completions `idx` (a slice or an index tensor)."""
        pick = (lambda x: None if x is None else x[idx])
        return Completions(*(pick(x) for x in (self.input_ids, self.attention_mask, self.prompt_len, self.canvas,
                                               self.keep, self.seeds)),
                           None if self.trace is None else self.trace.rows(idx))

    @property
    def free(self) -> torch.Tensor:
        """[b, l] the positions an estimate counts (all but the template's)."""
        return torch.ones_like(self.canvas, dtype=torch.bool) if self.keep is None else ~self.keep


def _corrupt(tokens: torch.Tensor, rate: torch.Tensor, keys: torch.Tensor, kind: str, vocab_size: int,
             mask_id: int | None, protect: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, n] with each position replaced with probability rate [b] (keys [b]: the rows' keys of this
    draw): a uniform random token (kind "uniform") or `mask_id` (an absorbing kind: masked, llada, dream);
    `protect` [b, n] positions never change. Returns (noisy [b, n], corrupted [b, n] bool)."""
    n = tokens.shape[1]
    u = rng.uniform(rng.position_keys(rng.fold(keys, NOISE_DRAW), n))  # [b, n]
    corrupted = u < rate[:, None]
    if protect is not None:
        corrupted = corrupted & ~protect
    if NOISES[kind].absorbing:
        if mask_id is None:
            raise ValueError(f"objective.kind={kind} needs a tokenizer with a mask token")
        repl = torch.full_like(tokens, mask_id)
    else:
        repl = rng.randint(rng.position_keys(rng.fold(keys, TOKEN_DRAW), n), vocab_size)  # [b, n]
    return torch.where(corrupted, repl, tokens), corrupted


def _token_logp(model, batch: Completions, input_ids: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                prediction: str) -> torch.Tensor:
    """log p_theta(x_i = canvas_i | noisy canvas [b, l], prompts `input_ids`) per position [b, l] (float32)."""
    l = noisy.shape[1]
    cache, _ = encode(model, input_ids, batch.attention_mask, cache=training_cache(model))
    cache, mask = decoder_context(model, cache, batch.prompt_len, l)
    pos = batch.prompt_len[:, None] + torch.arange(l, device=noisy.device)[None, :]  # [b, l]
    clean = batch.canvas if block_diffusion(model) else None  # block diffusion: each block beside the clean ones
    logits = lm_logits(model, decode_hidden(model, noisy, cache, decoder_attention_mask=mask,
                                            decoder_position_ids=pos, clean_canvas=clean))  # [b, l, v] float32
    if prediction == "mean_loo":
        logits = loo_to_denoiser_logits(logits, noisy, t)
    return -F.cross_entropy(logits.flatten(0, 1), batch.canvas.flatten(), reduction="none").view_as(batch.canvas)


def one_pass(model, batch: Completions, objective, vocab_size: int, mask_id: int | None, draws: int = 1,
             prompt_noise: float = 0.15) -> torch.Tensor:
    """d1's mean-field estimate (module docstring): per-position log-probabilities [b, l] of the completion with its
    canvas fully noised and the prompt perturbed with probability `prompt_noise`, averaged over `draws` passes."""
    b = batch.canvas.shape[0]
    keys = rng.seed_keys(batch.seeds)  # [b]
    t = torch.full((b,), 1.0 - objective.eps, device=batch.canvas.device)  # [b] the canvas' noise level
    prompt_pad = ~batch.attention_mask.bool()  # never perturb padding
    total = 0.0
    for d in range(draws):
        k = rng.fold(keys, d)
        noisy, _ = _corrupt(batch.canvas, t, rng.fold(k, LEVEL_DRAW), objective.kind, vocab_size, mask_id, batch.keep)
        ids = batch.input_ids
        if prompt_noise > 0:
            rate = torch.full((b,), float(prompt_noise), device=ids.device)
            ids, _ = _corrupt(ids, rate, rng.fold(k, PROMPT_DRAW), objective.kind, vocab_size, mask_id, prompt_pad)
        total = total + _token_logp(model, batch, ids, noisy, t, objective.prediction)
    return total / draws


def elbo(model, batch: Completions, objective, vocab_size: int, mask_id: int | None, draws: int = 2,
         prompt_noise: float = 0.0) -> torch.Tensor:
    """The ELBO-style estimate (module docstring): per-position weighted log-probabilities [b, l] of the clean
    completion at `draws` stratified noise levels, averaged over the levels (`prompt_noise` is not used: the
    prompt stays clean, as in the SFT loss)."""
    keys = rng.seed_keys(batch.seeds)  # [b]
    u = rng.uniform(rng.fold(keys, LEVEL_DRAW))  # [b] one offset per row, shared by its K levels
    eps = objective.eps
    total = 0.0
    for d in range(draws):
        t = eps + (1 - 2 * eps) * (d + u) / draws  # [b] the d-th stratum
        noisy, corrupted = _corrupt(batch.canvas, t, rng.fold(keys, d), objective.kind, vocab_size, mask_id,
                                    batch.keep)
        logp = _token_logp(model, batch, batch.input_ids, noisy, t, objective.prediction)  # [b, l]
        if NOISES[objective.kind].absorbing:  # the MDLM bound at the estimator's own levels
            logp = logp * corrupted.float() / t.clamp(min=objective.t_min_weight)[:, None]
        total = total + logp
    return total / draws


def trajectory(model, batch: Completions, objective, vocab_size: int, mask_id: int | None, draws: int = 1,
               prompt_noise: float = 0.0) -> torch.Tensor:
    """The sampler's own log-probabilities of its kept draws (module docstring): [b, k * l], step after step,
    meaningful where `counted(batch, "trajectory")` is True (the objective, `draws` and `prompt_noise` are not used:
    the trace fixes the canvases)."""
    tr = batch.trace
    if tr is None:
        raise ValueError("the trajectory estimator needs the sampler's trace of the completions (Completions.trace)")
    k, b, l = tr.canvas.shape
    cache, _ = encode(model, batch.input_ids, batch.attention_mask, cache=training_cache(model))
    cache, mask = decoder_context(model, cache, batch.prompt_len, l)
    pos = batch.prompt_len[:, None] + torch.arange(l, device=tr.canvas.device)[None, :]  # [b, l]
    sc, out = None, []
    for j in range(k):
        logits = lm_logits(model, decode_hidden(model, tr.canvas[j], cache, self_conditioning_logits=sc,
                                                decoder_attention_mask=mask, decoder_position_ids=pos))  # [b, l, v]
        if tr.mask_id is not None:
            logits = logits.index_fill(-1, torch.tensor([tr.mask_id], device=logits.device), float("-inf"))
        if tr.noise_level is not None:
            logits = loo_to_denoiser_logits(logits, tr.canvas[j], tr.noise_level[j])
        scaled = logits / tr.temperatures[j]  # [b, l, v] the distribution the step drew from
        out.append(-F.cross_entropy(scaled.flatten(0, 1), tr.tokens[j].flatten(), reduction="none").view(b, l))
        if tr.self_conditioning:
            sc = scaled.detach().to(embedding_dtype(model))
    return torch.cat(out, 1)  # [b, k * l]


ESTIMATORS = {"one_pass": one_pass, "elbo": elbo, "trajectory": trajectory}  # method.estimator -> estimator


def counted(batch: Completions, estimator: str) -> torch.Tensor:
    """[b, n] the positions of `estimator`'s output that count: the kept draws of every step for `trajectory`
    ([b, k * l], step after step), the free canvas positions for the others ([b, l])."""
    if estimator == "trajectory":
        return batch.trace.drawn.transpose(0, 1).flatten(1)
    return batch.free


def sequence_logp(token_logp: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """The sequence estimate [b]: the mean of `token_logp` [b, l] over the free positions [b, l]."""
    f = free.float()
    return (token_logp * f).sum(-1) / f.sum(-1).clamp(min=1.0)
