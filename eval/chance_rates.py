"""Chance level of the coloring task: the solved rate of uniformly random colours on the test split, per bucket.

`python eval/chance_rates.py [overrides]` composes the config like `dgtune.train` (e.g. `recipe=coloring`), builds the
same test split (no model) and prints, per bucket, the mean over rows of P(random colours are proper), computed
exactly (`dgtune.tasks.coloring.chance_solved`). A tuned model should beat this, not just the base.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from dgtune.config import compose
from dgtune.tasks import build_task
from dgtune.tasks.coloring import chance_solved, parse_prompt


def main(argv: list[str]) -> None:
    """Print the chance solved rate per bucket of the configured coloring test split."""
    cfg = compose(argv or ["recipe=coloring"])
    if cfg.task.name != "coloring":
        raise SystemExit(f"chance rates are defined for task=coloring, not {cfg.task.name!r}")
    task = build_task(cfg.task)
    rows = task.build_split("test", cfg.task.n_test, cfg.task.seed)
    by_bucket = defaultdict(list)
    for row in rows:
        edges, _, k = parse_prompt(row["prompt"])
        p = chance_solved(edges, int(row["puzzle"]), k)
        by_bucket[row["bucket"]].append(p)
        by_bucket["all"].append(p)
    for bucket, ps in by_bucket.items():
        print(f"{bucket}: n={len(ps)} chance solved={sum(ps) / len(ps):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
