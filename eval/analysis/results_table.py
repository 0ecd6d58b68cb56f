"""Print the README's results table from finished runs: `python eval/analysis/results_table.py RUN_DIR [RUN_DIR ...]`.

For each run (and each `report.json` under it, e.g. `RUN_DIR/d1/report.json` from a `task.test_file` eval) it
prints one Markdown row per (model, sampler, bucket) at the step counts asked for (`--steps`, default 4 8 12 48):
solved rate with its Wilson 95% interval, blank-cell accuracy, mean NFE, steps_to_plateau, and the run's recipe
and training minutes (from `metrics.jsonl`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def train_minutes(run: Path) -> float | None:
    """Training wall time recorded by the trainer."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        rec = json.loads(line)
        if "train/minutes" in rec:
            return rec["train/minutes"]
    return None


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", nargs="+", type=int, default=[4, 8, 12, 48])
    ap.add_argument("--buckets", nargs="+", default=["all", "easy", "medium", "hard"])
    args = ap.parse_args()
    print("| run | test set | model | sampler | bucket | " + " | ".join(f"solved@{s} [95% CI] / blank-cell" for s in args.steps)
          + " | steps_to_plateau | train min |")
    print("|---|---|---|---|---|" + "---|" * len(args.steps) + "---|---|")
    for run in args.runs:
        minutes = train_minutes(run)
        recipe = run.name.rsplit("-", 2)[0]
        for report in sorted(run.glob("**/report.json")):
            data = json.loads(report.read_text())
            test = Path(data["meta"].get("test_file") or "generated").name
            series = {}
            for r in data["rows"]:
                series.setdefault((r["model"], r["sampler"], r["bucket"]), {})[r["steps"]] = r
            for (model, sampler, bucket), by_steps in series.items():
                if bucket not in args.buckets:
                    continue
                cells = []
                for s in args.steps:
                    r = by_steps.get(s)
                    cells.append("-" if r is None else
                                 f"{r['solved']:.3f} [{r['solved_lo']:.2f}, {r['solved_hi']:.2f}] / {r['cell_acc']:.3f}")
                plateau = next(iter(by_steps.values()))["steps_to_plateau"]
                print(f"| {recipe} | {test} | {model} | {sampler} | {bucket} | " + " | ".join(cells)
                      + f" | {plateau if plateau is not None else '-'} | {minutes:.1f} |" if minutes else " | - |")


if __name__ == "__main__":
    main()
