"""The Triton step-statistics kernel matches the PyTorch path (run in Triton's interpreter on CPU)."""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton defines the kernel (no GPU here)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

if "dgtune.sampling.triton_stats" in sys.modules:  # imported earlier without the interpreter: redefine the kernel
    importlib.reload(sys.modules["dgtune.sampling.triton_stats"])
from dgtune.sampling import rng, stats, triton_stats  # noqa: E402

stats._TRITON = None  # forget a module probed before the interpreter was switched on


def _logits(n=96, v=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, v, generator=g) * 4
    x[1, 7] = 500.0  # confident row
    x[2] = 0.25  # all tied: argmax is the first id
    x[3, 5] = float("-inf")  # a suppressed id ([MASK] in mask-noise sampling)
    return x


@pytest.mark.parametrize("noise_kind", ["none", "uniform", "keys"])
def test_kernel_matches_torch(noise_kind):
    logits = _logits()
    n, v = logits.shape
    keys = rng.mix32(torch.arange(n) + 11)
    kw = {"none": {}, "uniform": {"noise": rng.vocab_uniform(keys, v)}, "keys": {"noise_keys": keys}}[noise_kind]
    # 2 programs of 48 rows, 2 vocab blocks each (tests the online merge and the column mask)
    got = triton_stats.step_stats_triton(logits, 0.7, rows_per_program=48, block_v=128, **kw)
    ref = stats.step_stats_torch(logits, 0.7, **kw)
    for name, a, b in zip(ref._fields, got, ref):
        if b is None:
            assert a is None, name
        elif b.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert got.argmax[2] == 0 and got.max_prob[1] > 0.999


def test_dispatch_backend_triton():
    logits = _logits(n=8, v=40)
    a = stats.step_stats(logits, 1.0, backend="triton")
    b = stats.step_stats(logits, 1.0, backend="torch")
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.argmax, b.argmax)
