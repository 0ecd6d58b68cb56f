"""Triton kernel for `dgtune.sampling.stats.step_stats`: one pass over logits [n, v] per row, online softmax.

Each program handles `rows_per_program` rows and walks the vocabulary in blocks of `BLOCK_V`, keeping the running
max, sum of exp, sum of exp * (z - max) (for the entropy), top-1/top-2 and the Gumbel-max candidate. Noise is
either loaded (uniforms [n, v]) or hashed in registers from per-row keys with the same 32-bit hash as
`dgtune.sampling.rng` (wrapping uint32 products equal the int64 products masked to 32 bits).

Without a GPU, set `TRITON_INTERPRET=1` before this module is imported to run the kernel in Triton's interpreter.
"""

from __future__ import annotations

import torch

from dgtune.sampling import rng
from dgtune.sampling.config import StepStats

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # pragma: no cover - triton not installed
    AVAILABLE = False

if AVAILABLE:

    @triton.jit
    def _mix32(x):
        """lowbias32-style hash on uint32 (same constants as rng.mix32)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x5BD1E995
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _stats_kernel(logits_ptr, noise_ptr, keys_ptr, out_f_ptr, out_i_ptr, n_rows, n_cols, stride_row,
                      stride_noise, temperature, NOISE_MODE: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_V: tl.constexpr):
        """out_f [4, n]: entropy, max_prob, margin, (unused); out_i [2, n]: argmax, sample.
        NOISE_MODE: 0 none, 1 uniforms from noise_ptr, 2 hashed from keys_ptr."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_V)
        for r in range(ROWS):
            row_raw = pid * ROWS + r
            row_ok = row_raw < n_rows
            row = tl.minimum(row_raw, n_rows - 1).to(tl.int64)  # out-of-range rows recompute the last row
            if NOISE_MODE == 2:
                key = tl.load(keys_ptr + row).to(tl.uint32)
            m = -float("inf")
            s = 0.0
            t = 0.0
            best1 = -float("inf")
            best2 = -float("inf")
            idx1 = 0
            gbest = -float("inf")
            gidx = 0
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
                z = x / temperature
                c1 = tl.max(z, 0)
                i1 = tl.argmax(z, 0) + start
                c2 = tl.max(tl.where(offs == i1, -float("inf"), z), 0)
                new1 = c1 > best1
                best2 = tl.where(new1, tl.maximum(best1, c2), tl.maximum(best2, c1))
                idx1 = tl.where(new1, i1, idx1)
                best1 = tl.maximum(best1, c1)
                m_new = tl.maximum(m, c1)
                delta = tl.where(s > 0, m - m_new, 0.0)
                scale = tl.exp(delta)
                valid = mask & (z > -float("inf"))  # padding columns and -inf logits (e.g. a suppressed [MASK])
                d = tl.where(valid, z - m_new, 0.0)
                e = tl.where(valid, tl.exp(d), 0.0)
                t = scale * (t + delta * s) + tl.sum(e * d, 0)
                s = s * scale + tl.sum(e, 0)
                m = m_new
                if NOISE_MODE != 0:
                    if NOISE_MODE == 1:
                        u = tl.load(noise_ptr + row * stride_noise + offs, mask=mask, other=0.5).to(tl.float32)
                    else:
                        ch = _mix32((offs + 0x632BE5AB).to(tl.uint32))
                        bits = _mix32(ch ^ key)
                        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                    y = tl.where(mask, z - tl.log(-tl.log(u)), -float("inf"))
                    cg = tl.max(y, 0)
                    ig = tl.argmax(y, 0) + start
                    gidx = tl.where(cg > gbest, ig, gidx)
                    gbest = tl.maximum(gbest, cg)
            entropy = tl.log(s) - t / s
            margin = (1.0 - tl.exp(best2 - best1)) / s
            tl.store(out_f_ptr + row, entropy, mask=row_ok)
            tl.store(out_f_ptr + n_rows + row, 1.0 / s, mask=row_ok)
            tl.store(out_f_ptr + 2 * n_rows + row, margin, mask=row_ok)
            tl.store(out_i_ptr + row, idx1.to(tl.int64), mask=row_ok)
            tl.store(out_i_ptr + n_rows + row, gidx.to(tl.int64), mask=row_ok)


def step_stats_triton(logits: torch.Tensor, temperature, noise: torch.Tensor | None = None,
                      noise_keys: torch.Tensor | None = None, rows_per_program: int | None = None,
                      block_v: int | None = None) -> StepStats:
    """Triton implementation of `step_stats` for logits [n, v] (same outputs as `step_stats_torch`)."""
    if not AVAILABLE:
        raise RuntimeError("triton is not importable")
    n, v = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    block_v = block_v or min(triton.next_power_of_2(v), 4096)
    rows = rows_per_program or max(1, min(16, 2048 // block_v))
    mode = 0 if noise is None and noise_keys is None else (1 if noise is not None else 2)
    if mode == 1:
        noise = noise.float()
        noise = noise if noise.stride(-1) == 1 else noise.contiguous()
    keys = (noise_keys.long() & rng.M32).contiguous() if mode == 2 else None
    out_f = torch.empty(4, n, device=logits.device, dtype=torch.float32)
    out_i = torch.empty(2, n, device=logits.device, dtype=torch.int64)
    temp = float(temperature)
    _stats_kernel[(triton.cdiv(n, rows),)](
        logits, noise if mode == 1 else logits, keys if mode == 2 else out_i, out_f, out_i, n, v, logits.stride(0),
        noise.stride(0) if mode == 1 else 0, temp, NOISE_MODE=mode, ROWS=rows, BLOCK_V=block_v)
    return StepStats(out_f[0], out_f[1], out_i[0], out_f[2], out_i[1] if mode else None)
