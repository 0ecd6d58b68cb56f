"""Chance level of the coloring task: the solved rate of uniformly random colours on the test split, per bucket.

`python eval/analysis/chance_rates.py [overrides]` composes the config like `dgtune.train` (e.g. `recipe=coloring`), builds the
same test split (no model) and prints, per bucket, the mean over rows of P(random colours are proper), computed
exactly (`dgtune.tasks.coloring.chance_solved`). A tuned model should beat this, not just the base.

`--guided 4,16` adds the chance level of verifier-guided sampling at those step counts (the `+verifier` curve of
`eval.guided=true`): a model with uniform colours run through the same schedule and rule guide as the top-k
strategies: each step picks ceil(free / steps left) random free vertices and gives each a random colour among
those no fixed neighbour holds (any colour if none is left: the guide's `forbidden`); the guide then sends back
both ends of an edge whose two new colours agree; at the last step the leftovers keep their draws. Estimated from
`--trials` draws per row (seeded). This is a randomised greedy colouring: a high bar, not a floor.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

from dgtune.config import compose
from dgtune.tasks import build_task
from dgtune.tasks.coloring import chance_solved, parse_prompt


def guided_chance(edges: list[tuple[int, int]], n: int, k: int, steps: int, rng: random.Random, pad: int = 0) -> bool:
    """One draw of uniform colours through the top-k schedule with the rule guide; True if the result is proper.
    `pad`: free canvas positions past the answer (EOS), which the schedule picks along with the vertices."""
    nbrs = [set() for _ in range(n)]
    for u, v in edges:
        nbrs[u].add(v)
        nbrs[v].add(u)
    colour: dict[int, int] = {}
    for left in range(steps, 0, -1):
        free = [v for v in range(n + pad) if v not in colour]  # vertices, then EOS positions
        if not free:
            break
        picked = rng.sample(free, -(-len(free) // left)) if left > 1 else free
        colour.update({v: 0 for v in picked if v >= n})  # an EOS position, committed
        new = {}
        for v in (v for v in picked if v < n):
            allowed = [c for c in range(1, k + 1) if all(colour.get(u) != c for u in nbrs[v])]
            new[v] = rng.choice(allowed or list(range(1, k + 1)))
        if left > 1:  # the veto: two new neighbours with one colour both go back
            new = {v: c for v, c in new.items() if all(new.get(u) != c for u in nbrs[v])}
        colour.update(new)
    return all(colour[u] != colour[v] for u, v in edges)  # (EOS positions have no edges)


def main(argv: list[str]) -> None:
    """Print the chance solved rate per bucket of the configured coloring test split."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guided", default="", help="step counts for the guided chance level, e.g. 4,16")
    ap.add_argument("--trials", type=int, default=200, help="draws per row for the guided chance level")
    args, overrides = ap.parse_known_args(argv)
    steps = [int(s) for s in args.guided.split(",") if s]
    cfg = compose(overrides or ["recipe=coloring"])
    if cfg.task.name != "coloring":
        raise SystemExit(f"chance rates are defined for task=coloring, not {cfg.task.name!r}")
    task = build_task(cfg.task)
    rows = task.build_split("test", cfg.task.n_test, cfg.task.seed)
    by_bucket = defaultdict(list)
    rng = random.Random(cfg.seed)
    for row in rows:
        edges, n, k = parse_prompt(row["prompt"])
        p = [chance_solved(edges, n, k)]
        pad = task.canvas_length - 2 * n  # free positions past the answer when the labels are in the template
        p += [sum(guided_chance(edges, n, k, s, rng, pad) for _ in range(args.trials)) / args.trials for s in steps]
        by_bucket[row["bucket"]].append(p)
        by_bucket["all"].append(p)
    for bucket, ps in by_bucket.items():
        mean = [sum(col) / len(ps) for col in zip(*ps)]
        guided = "".join(f" guided@{s}={m:.4f}" for s, m in zip(steps, mean[1:]))
        print(f"{bucket}: n={len(ps)} chance solved={mean[0]:.4f}{guided}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
