"""The benchmark scripts' workers still run on the current code (eval/bench/ is not run by CI otherwise): one
training step of bench_train's worker on the bundled tiny model, for each objective config it offers."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "bench"))


@pytest.mark.parametrize("objective", ["released", "mean_loo", "masked"])
def test_bench_train_worker_runs_a_step(objective):
    import bench_train

    args = Namespace(builder="dgtune.models.tiny:build_tiny_model", batch=2, prompt=8, canvas=24, steps=1, threads=1,
                     device="cpu", objective=objective, bf16=False, chunk=16, ckpt=False, four_bit=False)
    threads = torch.get_num_threads()
    try:
        out = bench_train.worker(args)  # sets torch's thread count (its own process, when the script runs it)
    finally:
        torch.set_num_threads(threads)  # later tests' numbers depend on it (test_long_answers did)
    assert out["tokens"] > 0 and out["step_s"] > 0 and out["peak_mib"] > 0
