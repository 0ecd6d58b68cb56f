"""Wilson 95% intervals for solved counts: `python eval/analysis/interval.py 0/64 437/500 ...`.

The interval `dgtune.eval` writes into `report.json` (`solved_lo`, `solved_hi`), from a count and a total; used to
restate the intervals of README rows measured before reports switched from the percentile bootstrap to Wilson.
"""

from __future__ import annotations

import sys

from dgtune.eval.report import proportion_ci


def main(argv: list[str]) -> None:
    """Print `k/n  rate  [lo, hi]` for each `k/n` argument."""
    if not argv:
        print(__doc__)
        raise SystemExit(2)
    for item in argv:
        k, _, n = item.partition("/")
        lo, hi = proportion_ci(int(k), int(n))
        print(f"{item:>9}  {int(k) / int(n):.3f}  [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main(sys.argv[1:])
