"""Where few-step decoding loses puzzles (not a test): forward passes used by solved and failed rows.

    python eval/analysis/failures_by_passes.py RUN_DIR [--steps 4,16] [--test-file CSV] [key=value ...]

Samples the run's tuned adapter (the eval sampler of its config, plus any `key=value` overrides such as
`sampler.t_max=1.0`) at each step count on `--test-file` (e.g. ../shared/benchmarks/sudoku_4x4_d1_test.csv) or
the run's generated test split, and prints per step count the solved rate, the histogram of forward passes (NFE)
per row, and that of the failed rows. With two or more step counts it also prints, for the rows that fail at the
first, how many passes they used and how many were solved at the last: rows that fail only because they were cut
at the step limit need more passes, not a different sampler setting.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def histogram(values) -> str:
    """'nfe:count' pairs in increasing nfe."""
    return " ".join(f"{int(k)}:{v}" for k, v in sorted(collections.Counter(values).items()))


def main(argv=None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", default="4,16", help="comma-separated step counts (default 4,16)")
    ap.add_argument("--test-file", default=None, help="CSV puzzle,solution (graded by the rules); default: test split")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. sampler.t_max=1.0")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from dgtune.data import splits_for
    from dgtune.eval.runner import test_rows
    from dgtune.eval.runs import load_run, compose_run
    from dgtune.sampling.config import sampler_config
    from dgtune.eval.runner import evaluate
    from dgtune.tasks import build_task

    extra = list(args.overrides) + ([f"task.test_file={args.test_file}"] if args.test_file else [])
    cfg = compose_run(OmegaConf.load(args.run_dir / "config.yaml"), extra)
    task = build_task(cfg.task)
    tuned, tok, _ = load_run(args.run_dir, cfg)
    tuned.config.canvas_length = task.canvas_length
    splits = None
    if not cfg.task.get("test_file"):
        splits = splits_for(task, cfg)
    rows = test_rows(task, splits, cfg)
    steps = [int(s) for s in args.steps.split(",")]
    records, _ = evaluate(tuned, tok, task, rows, steps, sampler_config(cfg, tok), cfg.eval.batch_size, cfg.seed,
                          "tuned")
    by_steps = {s: sorted((r for r in records if r["steps"] == s), key=lambda r: r["row"]) for s in steps}
    print(f"{args.run_dir} on {cfg.task.get('test_file') or 'the generated test split'} ({len(rows)} rows)")
    for s, recs in by_steps.items():
        solved = sum(r["solved"] for r in recs) / len(recs)
        print(f"@{s}: solved {solved:.3f}; passes per row {histogram(r['nfe'] for r in recs)}; "
              f"failed rows {histogram(r['nfe'] for r in recs if not r['solved'])}")
    if len(steps) > 1:
        first, last = by_steps[steps[0]], by_steps[steps[-1]]
        failed = [i for i, r in enumerate(first) if not r["solved"]]
        cut = sum(first[i]["nfe"] == steps[0] for i in failed)
        print(f"rows failing @{steps[0]}: {len(failed)}, {cut} of them cut at the step limit; their passes "
              f"@{steps[-1]}: {histogram(last[i]['nfe'] for i in failed)}; solved @{steps[-1]}: "
              f"{sum(int(last[i]['solved']) for i in failed)}")


if __name__ == "__main__":
    main()
