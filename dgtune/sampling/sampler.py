"""The diffusion sampler shared by training-time eval, `dgtune.eval` and `dgtune.sample`: `sample()` is the one
front door.

`mode="reference"` (`reference.py`, the algorithm and its equality with transformers' `generate()` described there)
draws what `DiffusionGemmaForBlockDiffusion.generate()` draws for the same seed. `mode="fast"` (`fast.py`, the
default, set in `SamplerConfig`) runs the same algorithm with retired finished
rows, one-pass step statistics and per-row counter-based random numbers (batch invariant), and every strategy of
`dgtune.sampling.strategies` (`entropy_bound`, `topk_confidence`, `topk_margin`, `topk_entropy`, `topk_random`,
`threshold`) with uniform or [MASK] noise. Strategies other than `entropy_bound` with uniform noise, canvas
templates and rule guides have no `generate()` counterpart and always run on the fast path.
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import block_diffusion, unwrap
from dgtune.sampling.block import sample_blocks
from dgtune.sampling.config import SampleResult, SamplerConfig, pad_after_eos, sampler_config  # noqa: F401  (re-exported)
from dgtune.sampling.fast import sample_fast
from dgtune.sampling.reference import sample_reference, token_entropy  # noqa: F401  (re-exported)
from dgtune.sampling.strategies import entropy_bound_accept, temperature  # noqa: F401  (re-exported)


def uses_reference(cfg: SamplerConfig) -> bool:
    """True when `cfg` runs the generate()-mirroring loop (`reference.py`) (mode "reference", entropy_bound, uniform noise)."""
    if cfg.mode not in ("reference", "fast"):
        raise ValueError(f"sampler mode must be 'reference' or 'fast', got {cfg.mode!r}")
    if cfg.prediction not in ("denoiser", "mean_loo"):
        raise ValueError(f"sampler prediction must be 'denoiser' or 'mean_loo', got {cfg.prediction!r}")
    return (cfg.mode == "reference" and cfg.strategy == "entropy_bound" and cfg.noise == "uniform"
            and cfg.prediction == "denoiser" and cfg.self_conditioning and cfg.last_step == "argmax")


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator, eos_id: int, pad_id: int,
           canvas_length: int | None = None, row_seeds: torch.Tensor | None = None,
           template: torch.Tensor | None = None, guide=None, trace: list | None = None,
           branch: tuple | None = None) -> SampleResult:
    """Sample responses for equal-length prompts [b, p] (group prompts by length before calling).

    `row_seeds` [b] (fast path only): one seed per row, so that a row's output does not depend on the batch;
    by default drawn from `generator`. The reference path draws from `generator` like generate() does.
    `template` [b, l] (known canvas tokens, -1 = free), `guide` (a rule checker, `dgtune.sampling.guide`) and
    `trace` (a list that receives each step's `TraceStep`, one canvas) and `branch` (step, seeds [b]: tree
    rollouts, see `sample_fast`) run on the fast path. A block-diffusion model (`ModelFamily.block_diffusion`)
    samples with its block sampler (`block.py`, templates and traces too); with `commit=sample` its draws come from
    `generator` (or one seeded from the first row seed)."""
    if block_diffusion(model):
        if guide is not None or branch is not None:
            raise ValueError("a block-diffusion model's sampler (dgtune.sampling.block) takes no guide or branch: "
                             "tree rollouts and rule guides are not built for it")
        if generator is None:
            seed = 0 if row_seeds is None else int(row_seeds[0])
            generator = torch.Generator(prompt_ids.device).manual_seed(seed)
        return sample_blocks(model, prompt_ids, cfg, generator, eos_id, pad_id,
                             canvas_length or unwrap(model).config.canvas_length, template, trace)
    if (not uses_reference(cfg) or template is not None or guide is not None or trace is not None
            or branch is not None):
        return sample_fast(model, prompt_ids, cfg, generator, eos_id, pad_id, canvas_length, row_seeds, template, guide,
                           trace, branch)
    return sample_reference(model, prompt_ids, cfg, generator, eos_id, pad_id, canvas_length)
