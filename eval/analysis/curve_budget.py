"""What a learning curve predicts: training sequences (and CPU time) until blank-cell accuracy reaches a target.

Fits blank-cell accuracy at `--steps` denoising steps against log10(sequences seen) by least squares over the
points of `<run_dir>/learning_curve.jsonl` from `--from-step` on, and extrapolates the line to each `--target`
(solving 9x9 Sudoku takes blank-cell accuracy near 0.9 and above: the solved rate stays near 0 until then). The
time per sequence comes from the run's own `metrics.jsonl` (`train/elapsed_s` against steps). A straight line in
log(sequences) is a guess about the future, not a measurement: the script prints the fit's residuals so the reader
can judge it.

Launch: `python eval/analysis/curve_budget.py runs/solve_pilot --from-step 1950 [--speed-from OTHER_RUN_DIR]`
(`--speed-from`: take the time per sequence from another run of the same recipe, e.g. one timed alone)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("need points at two or more different sequence counts")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def seconds_per_sequence(run_dir: Path) -> float | None:
    """Training wall seconds per sequence from metrics.jsonl (last record with train/elapsed_s), or None."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    cfg_batch = None
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        from omegaconf import OmegaConf

        c = OmegaConf.load(cfg)
        cfg_batch = int(c.trainer.batch_size) * int(c.trainer.get("grad_accum", 1))
    last = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "train/elapsed_s" in rec:
            last = rec
    if last is None or not cfg_batch:
        return None
    return last["train/elapsed_s"] / (last["step"] * cfg_batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=12, help="the denoising steps of the curve's column")
    ap.add_argument("--from-step", type=int, default=0, help="fit only points from this training step on")
    ap.add_argument("--speed-from", type=Path, help="read seconds per sequence from this run's metrics.jsonl")
    ap.add_argument("--target", type=float, nargs="+", default=[0.9, 0.95])
    args = ap.parse_args()
    points = [json.loads(l) for l in (args.run_dir / "learning_curve.jsonl").read_text().splitlines() if l.strip()]
    key = f"cell_acc@{args.steps}"
    points = [p for p in points if p["step"] >= args.from_step and key in p and p["sequences"] > 0]
    if len(points) < 2:
        raise SystemExit(f"{args.run_dir}: fewer than 2 curve points with {key} from step {args.from_step}")
    xs = [math.log10(p["sequences"]) for p in points]
    ys = [p[key] for p in points]
    a, b = fit_line(xs, ys)
    print(f"fit over {len(points)} points (steps {points[0]['step']}-{points[-1]['step']}, "
          f"{points[0]['sequences']:,}-{points[-1]['sequences']:,} sequences): "
          f"{key} = {a:.3f} + {b:.3f} log10(sequences)")
    for p, x, y in zip(points, xs, ys):
        print(f"  step {p['step']:>6} sequences {p['sequences']:>9,} measured {y:.3f} fit {a + b * x:.3f}")
    sps = seconds_per_sequence(args.speed_from or args.run_dir)
    speed_of = f"{(args.speed_from or args.run_dir).name}'s"
    for target in args.target:
        if b <= 0:
            print(f"target {target}: the curve does not rise, no budget can be read from it")
            continue
        seqs = 10 ** ((target - a) / b)
        hours = f", {seqs * sps / 3600:,.0f} h at {speed_of} {1 / sps:.1f} sequences/s" if sps else ""
        print(f"target {key} {target}: {seqs:,.0f} sequences{hours}")


if __name__ == "__main__":
    main()
