"""The diffusion sampler shared by training-time eval, `dgtune.eval` and `dgtune.sample`.

Per canvas: start from uniform random tokens; each step runs the decoder on the canvas with the cached prompt KV
and the previous step's (temperature-scaled) logits for self-conditioning; the temperature falls linearly from
`t_max` (first step) towards `t_min`; tokens are sampled, the lowest-entropy positions are accepted while the sum of
their entropies minus the largest stays <= `entropy_bound`, the rest are renoised; a row stops when its argmax
canvas is unchanged for `stability_threshold` steps and its mean entropy is < `confidence_threshold`, or at
`max_steps`. The output is the argmax canvas. Canvases continue until EOS (up to `max_canvases`).

With the same seed, the random draws (canvas init, multinomial, renoise) happen in the same order and shapes as
`DiffusionGemmaForBlockDiffusion.generate()`, the rows that emitted EOS in an earlier canvas are still denoised
(and encoded, as pad) as there, and the self-conditioning logits are rounded to the embedding dtype as there, so
both produce the same tokens and forward-pass counts, in fp32 and bf16, for one or several canvases
(tests/test_sampler.py).

That is `mode="reference"` (the `SamplerConfig` default). `mode="fast"` (`dgtune.sampling.fast`, the default of
`configs/sampler/*.yaml`) runs the same algorithm with retired finished rows, one-pass step statistics and
per-row counter-based random numbers (batch invariant), and every strategy of `dgtune.sampling.strategies`
(`entropy_bound`, `topk_confidence`, `topk_margin`, `topk_entropy`, `topk_random`, `threshold`) with uniform or
[MASK] noise. Strategies other than `entropy_bound` with uniform noise have no `generate()` counterpart and always
run on the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgtune.diffusion.model_calls import decode, encode, unwrap
from dgtune.sampling.strategies import entropy_bound_accept, temperature  # noqa: F401  (re-exported)


@dataclass
class SamplerConfig:
    """Sampler settings (mirrors `configs/sampler/*.yaml`)."""

    strategy: str = "entropy_bound"
    max_steps: int = 48
    t_max: float = 0.8
    t_min: float = 0.4
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_canvases: int = 1
    mode: str = "reference"  # "reference": same draws as transformers' generate(); "fast": dgtune.sampling.fast
    noise: str = "uniform"  # "uniform" (renoise with random tokens) | "mask" (absorbing [MASK] noise)
    mask_token_id: int | None = None  # for noise="mask" (default: the model config's mask_token_id)
    threshold: float = 0.9  # strategy "threshold": commit positions with max-prob > threshold
    commit: str = "sample"  # committed strategies commit the sampled token ("sample") or the argmax ("argmax")
    sync_every: int = 0  # fast mode: retire finished rows every N steps (0: 1 on CPU, 4 on accelerators)
    stats_backend: str = "auto"  # fast mode step statistics: "auto" (Triton on CUDA) | "torch" | "triton"
    decoder: str = "auto"  # fast mode: "fused" (dgtune.sampling.fused_decoder) | "transformers" | "auto" (fused if supported)
    decoder_dtype: str = "auto"  # fused matmuls: "auto" (model dtype) | "fast" (bf16 where fast) | "bfloat16"
    prediction: str = "denoiser"  # what the decoder outputs: "denoiser" | "mean_loo" (leave-one-out posterior)
    compile: bool = False  # fast mode: torch.compile the fused decoder (pays off over long evals)
    self_conditioning: bool = True  # feed each step's logits to the next (as generate()); off for models trained
    # without it (objective.self_cond_p=0), which never saw that signal in training


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [b, n_canvases * l], pad after the first EOS
    nfe: torch.Tensor  # [b] decoder forward passes per sequence


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. [b, l, v] -> [b, l]"""
    logp = logits - logits.logsumexp(-1, keepdim=True)  # same ops as torch.distributions.Categorical.entropy
    probs = torch.softmax(logp, dim=-1)
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * probs).sum(-1)


def denoise_step(
    raw_logits: torch.Tensor,
    canvas: torch.Tensor,
    cur_step: int,
    cfg: SamplerConfig,
    vocab_size: int,
    generator: torch.Generator,
):
    """One sampler step on logits [b, l, v] of canvas [b, l].

    Returns (next canvas [b, l], argmax canvas [b, l], processed logits [b, l, v], entropy [b, l]).
    Random draws: one multinomial sample per position, then one renoise token per position.
    """
    b, l = canvas.shape
    logits = raw_logits / temperature(cur_step, cfg.max_steps, cfg.t_min, cfg.t_max)  # [b, l, v]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, vocab_size), 1, generator=generator).view(b, l)
    argmax = logits.argmax(-1)
    entropy = token_entropy(logits)
    accepted = entropy_bound_accept(entropy, cfg.entropy_bound)
    noise = torch.randint(0, vocab_size, (b, l), generator=generator, device=canvas.device)
    next_canvas = torch.where(accepted, sampled, noise)
    return next_canvas, argmax, logits, entropy


@torch.no_grad()
def denoise_canvas(model, cache, batch_size: int, canvas_length: int, vocab_size: int, cfg: SamplerConfig,
                   generator: torch.Generator, position_offset: int, done: torch.Tensor | None = None):
    """Run the denoising loop for one canvas; returns (argmax canvas [b, l], nfe [b]).

    As in generate(), every row is denoised, `done` [b] (rows that emitted EOS in an earlier canvas) included: each
    canvas starts with no row finished, the loop stops when all rows are stable and confident (or at `max_steps`),
    and only the forward passes of rows neither finished nor done are counted. Self-conditioning logits are kept
    in the embedding dtype (bf16 on a bf16 model), as generate() keeps them."""
    device = cache.layers[0].keys.device
    embed_dtype = unwrap(model).model.decoder.embed_tokens.weight.dtype
    canvas = torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator, device=device)
    positions = torch.arange(position_offset, position_offset + canvas_length, device=device)[None]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    done = finished if done is None else done
    nfe = torch.zeros(batch_size, device=device)
    history = torch.full((max(cfg.stability_threshold, 1), batch_size, canvas_length), -1, device=device, dtype=torch.long)
    argmax, sc_logits = canvas, None
    for cur_step in range(cfg.max_steps, 0, -1):
        nfe += (~(finished | done)).float()
        raw = decode(model, canvas, cache, self_conditioning_logits=sc_logits, decoder_position_ids=positions)
        next_canvas, new_argmax, logits, entropy = denoise_step(raw, canvas, cur_step, cfg, vocab_size, generator)
        if finished.any():  # rows that already stopped keep their state (finished is all False on step 1)
            f = finished[:, None]
            new_argmax = torch.where(f, argmax, new_argmax)
            next_canvas = torch.where(f, canvas, next_canvas)
            logits = torch.where(f[..., None], sc_logits, logits)  # [b, l, v] fp32 (sc_logits rounded, as generate())
            entropy = token_entropy(logits)
        if cfg.stability_threshold == 0:
            stable = torch.ones(batch_size, dtype=torch.bool, device=device)
        else:
            stable = (history == new_argmax[None]).all(-1).all(0)
            history = torch.roll(history, -1, 0)
            history[-1] = new_argmax
        finished |= stable & (entropy.mean(-1) < cfg.confidence_threshold)
        canvas, argmax, sc_logits = next_canvas, new_argmax, logits.to(embed_dtype)
        if finished.all():
            break
    return argmax, nfe


def pad_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Tokens [b, n] with every position after a row's first EOS set to `pad_id` (the EOS itself is kept)."""
    is_eos = tokens == eos_id
    after_eos = (torch.cumsum(is_eos.long(), -1) - is_eos.long()) > 0
    return torch.where(after_eos, torch.full_like(tokens, pad_id), tokens)


def uses_reference(cfg: SamplerConfig) -> bool:
    """True when `cfg` runs the generate()-mirroring loop below (mode "reference", entropy_bound, uniform noise)."""
    if cfg.mode not in ("reference", "fast"):
        raise ValueError(f"sampler mode must be 'reference' or 'fast', got {cfg.mode!r}")
    if cfg.prediction not in ("denoiser", "mean_loo"):
        raise ValueError(f"sampler prediction must be 'denoiser' or 'mean_loo', got {cfg.prediction!r}")
    return (cfg.mode == "reference" and cfg.strategy == "entropy_bound" and cfg.noise == "uniform"
            and cfg.prediction == "denoiser" and cfg.self_conditioning)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator, eos_id: int, pad_id: int,
           canvas_length: int | None = None, row_seeds: torch.Tensor | None = None,
           template: torch.Tensor | None = None, guide=None) -> SampleResult:
    """Sample responses for equal-length prompts [b, p] (group prompts by length before calling).

    `row_seeds` [b] (fast path only): one seed per row, so that a row's output does not depend on the batch;
    by default drawn from `generator`. The reference path draws from `generator` like generate() does.
    `template` [b, l] (known canvas tokens, -1 = free) and `guide` (a rule checker, `dgtune.sampling.guide`) run on the fast path."""
    if not uses_reference(cfg) or template is not None or guide is not None:
        from dgtune.sampling.fast import sample_fast

        return sample_fast(model, prompt_ids, cfg, generator, eos_id, pad_id, canvas_length, row_seeds, template, guide)
    core_cfg = getattr(model, "config", None)
    canvas_length = canvas_length or core_cfg.canvas_length
    vocab_size = core_cfg.text_config.vocab_size
    b, p = prompt_ids.shape
    cache, _ = encode(model, prompt_ids)
    done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)  # rows with an EOS in an earlier canvas
    outputs, nfe, cur_len = [], torch.zeros(b, device=prompt_ids.device), p
    for k in range(cfg.max_canvases):
        argmax, n = denoise_canvas(model, cache, b, canvas_length, vocab_size, cfg, generator, cur_len, done)
        nfe += n
        # generate()'s finalisation: done rows get pad, this canvas' EOS rows pad after their EOS
        out = pad_after_eos(torch.where(done[:, None], torch.full_like(argmax, pad_id), argmax), eos_id, pad_id)
        outputs.append(out)
        done = done | (argmax == eos_id).any(-1)
        if done.all() or k + 1 == cfg.max_canvases:
            break
        positions = torch.arange(cur_len, cur_len + canvas_length, device=prompt_ids.device)[None]
        cache, _ = encode(model, out, cache=cache, position_ids=positions)  # the finalised canvas, as generate()
        cur_len += canvas_length
    return SampleResult(tokens=pad_after_eos(torch.cat(outputs, dim=1), eos_id, pad_id), nfe=nfe)
