"""Benchmark: the Triton step-statistics kernel against the PyTorch path on a GPU (not a test).

    python eval/bench/bench_stats_kernel.py [--rows 16x88,4x256] [--vocab 262144,60] [--reps 50]

For each (rows, vocab) shape, fp32 logits [rows, vocab] (Gemma's 262,144-token vocabulary by default), one sampler
step's statistics (temperature, entropy, max-prob, margin, argmax, Gumbel-max sample from per-row hash keys) through
`dgtune.sampling.stats.step_stats_torch` and `dgtune.sampling.triton_stats.step_stats_triton`, in this process:
checks that the two agree (argmax and sample equal, entropy / max-prob / margin within 1e-4) and prints the median
time of each over `--reps` calls (CUDA events, after warm-up), the ratio, and the kernel's effective bandwidth
(bytes of logits read / time). Needs CUDA and triton.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dgtune.sampling import rng  # noqa: E402
from dgtune.sampling.stats import step_stats_torch  # noqa: E402


def median_ms(fn, reps: int) -> float:
    """Median time of fn() in ms over `reps` CUDA-event-timed calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="16x88,4x256", help="comma-separated BATCHxCANVAS row shapes")
    ap.add_argument("--vocab", default="262144,60", help="comma-separated vocabulary sizes")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_stats_kernel.py needs a CUDA GPU")
    from dgtune.sampling.triton_stats import step_stats_triton

    dev = torch.device("cuda")
    print(f"[kernel] {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"{'rows':>10} {'vocab':>7} {'torch ms':>9} {'triton ms':>9} {'ratio':>6} {'triton GB/s':>11} agree")
    for shape in args.rows.split(","):
        b, l = (int(x) for x in shape.split("x"))
        for v in (int(x) for x in args.vocab.split(",")):
            g = torch.Generator(device=dev).manual_seed(0)
            logits = 4 * torch.randn(b * l, v, device=dev, generator=g)  # [n, v]
            keys = rng.position_keys(rng.seed_keys(torch.arange(b, device=dev)), l).reshape(-1)  # [n]
            t = torch.tensor(0.7, device=dev)
            ref = step_stats_torch(logits, t, noise_keys=keys)
            out = step_stats_triton(logits, t, noise_keys=keys)
            agree = (torch.equal(ref.argmax, out.argmax) and torch.equal(ref.sample, out.sample)
                     and all(torch.allclose(a, c, atol=1e-4, rtol=1e-4) for a, c in
                             ((ref.entropy, out.entropy), (ref.max_prob, out.max_prob), (ref.margin, out.margin))))
            t_torch = median_ms(lambda: step_stats_torch(logits, t, noise_keys=keys), args.reps)
            t_triton = median_ms(lambda: step_stats_triton(logits, t, noise_keys=keys), args.reps)
            gbs = logits.numel() * 4 / (t_triton * 1e-3) / 1e9
            print(f"{shape:>10} {v:>7} {t_torch:9.3f} {t_triton:9.3f} {t_torch / t_triton:6.1f} {gbs:11.0f} {agree}")
            del logits, ref, out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
