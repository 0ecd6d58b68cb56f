"""The learning curve: solved rate and blank-cell accuracy on a fixed validation set against training sequences seen.

Training appends one point per quick eval (`eval.quick_every` steps, on the first `eval.quick_n` validation rows of
`eval.quick_bucket`, at each of `eval.quick_steps`) to `<run_dir>/learning_curve.jsonl` and redraws
`<run_dir>/learning_curve.png`, so a user sees where the jump in solved rate comes while the run goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

from dgtune.eval.report import _atomic_write, proportion_ci

CURVE_FILE = "learning_curve.jsonl"
CURVE_PLOT = "learning_curve.png"


def read_curve(run_dir) -> list[dict]:
    """The points of `<run_dir>/learning_curve.jsonl` (empty when there is none)."""
    path = Path(run_dir) / CURVE_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_point(step: int, sequences: int, records: list[dict], steps_list) -> dict:
    """One point from quick-eval records (one per (steps, row)): per step count, solved (with its Wilson 95%
    interval) and blank-cell accuracy."""
    point = {"step": int(step), "sequences": int(sequences), "n": 0}
    for s in steps_list:
        rs = [r for r in records if r["steps"] == s]
        k = int(sum(r["solved"] for r in rs))
        lo, hi = proportion_ci(k, len(rs))
        point.update({f"solved@{s}": k / max(len(rs), 1), f"solved_lo@{s}": lo, f"solved_hi@{s}": hi,
                      f"cell_acc@{s}": sum(r["cell_acc"] for r in rs) / max(len(rs), 1)})
        point["n"] = len(rs)
    return point


def append_point(run_dir, point: dict) -> list[dict]:
    """Add `point` to the run's curve (atomically; points at or after its step, left by a run that was killed and
    resumed, are dropped first) and redraw the plot. Returns the whole curve."""
    run_dir = Path(run_dir)
    points = [p for p in read_curve(run_dir) if p["step"] < point["step"]] + [point]
    text = "".join(json.dumps(p) + "\n" for p in points)
    _atomic_write(run_dir / CURVE_FILE, lambda f: f.write(text.encode()))
    plot_curve(points, run_dir / CURVE_PLOT)
    return points


def plot_curve(points: list[dict], path) -> None:
    """Solved (solid, interval band) and blank-cell accuracy (dashed) against sequences seen, one line per step
    count; PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({int(k.split("@")[1]) for p in points for k in p if k.startswith("solved@")})
    xs = [p["sequences"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(steps):
        c = f"C{i % 10}"
        ax.plot(xs, [p.get(f"solved@{s}") for p in points], "-o", color=c, label=f"solved @{s} steps")
        ax.fill_between(xs, [p.get(f"solved_lo@{s}") for p in points], [p.get(f"solved_hi@{s}") for p in points],
                        color=c, alpha=0.2)
        ax.plot(xs, [p.get(f"cell_acc@{s}") for p in points], "--", color=c, label=f"blank-cell @{s} steps")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training sequences seen")
    ax.set_ylabel("accuracy (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
