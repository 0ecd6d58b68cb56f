"""Per-position statistics of one sampler step, in one pass over the logits.

`step_stats(logits, temperature, noise=None, noise_keys=None)` returns, for every row of logits [n, v] scaled by
1 / temperature: the entropy, the max probability, the argmax, the top1 - top2 probability margin and a Gumbel-max
sample. The noise is either given (uniforms [n, v]) or derived from 32-bit keys [n] with `dgtune.sampling.rng`
(the Triton kernel then never materialises [n, v] noise). On CUDA with triton importable the kernel in
`triton_stats.py` runs; otherwise the PyTorch code below (same signature, same outputs).
"""

from __future__ import annotations

import torch

from dgtune.sampling import rng
from dgtune.sampling.config import StepStats  # noqa: F401  (re-exported)


_TRITON = None  # None: not probed yet; False: unavailable; else the triton_stats module


def triton_module():
    """The Triton implementation module, or None when triton is not importable."""
    global _TRITON
    if _TRITON is None:
        try:
            from dgtune.sampling import triton_stats

            _TRITON = triton_stats if triton_stats.AVAILABLE else False
        except Exception:  # triton missing or broken: fall back to PyTorch
            _TRITON = False
    return _TRITON or None


def step_stats(logits: torch.Tensor, temperature, noise: torch.Tensor | None = None,
               noise_keys: torch.Tensor | None = None, backend: str = "auto") -> StepStats:
    """Statistics of logits [n, v] at `temperature` (float or 0-d tensor); backend "auto" | "torch" | "triton"."""
    if backend == "auto":
        backend = "triton" if logits.is_cuda and triton_module() is not None else "torch"
    if backend == "triton":
        mod = triton_module()
        if mod is None:
            raise RuntimeError("backend='triton' but triton is not importable")
        return mod.step_stats_triton(logits, temperature, noise, noise_keys)
    return step_stats_torch(logits, temperature, noise, noise_keys)


def step_stats_torch(logits: torch.Tensor, temperature, noise: torch.Tensor | None = None,
                     noise_keys: torch.Tensor | None = None) -> StepStats:
    """PyTorch implementation of `step_stats` (same formulas as the kernel)."""
    z = logits.float() / temperature  # [n, v]
    top = z.topk(min(2, z.shape[-1]), dim=-1).values  # [n, 2]
    m = top[:, 0:1]  # [n, 1]
    e = torch.exp(z - m)  # [n, v]
    s = e.sum(-1)  # [n]
    t = (e * (z - m).clamp(min=torch.finfo(torch.float32).min)).sum(-1)  # [n], s * E_p[z - m] (-inf logits add 0)
    entropy = torch.log(s) - t / s
    second = top[:, 1] if z.shape[-1] > 1 else torch.full_like(s, float("-inf"))
    margin = (1.0 - torch.exp(second - m[:, 0])) / s
    sample = None
    if noise is None and noise_keys is not None:
        noise = rng.vocab_uniform(noise_keys, z.shape[-1])  # [n, v]
    if noise is not None:
        sample = (z - torch.log(-torch.log(noise))).argmax(-1)  # Gumbel-max
    return StepStats(entropy, 1.0 / s, z.argmax(-1), margin, sample)
