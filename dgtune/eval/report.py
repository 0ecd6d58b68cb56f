"""Aggregate per-item eval records into accuracy-vs-steps tables, plots and report files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import NormalDist

import numpy as np

BUCKET_ORDER = ("all", "easy", "medium", "hard")
_MEAN_KEYS = ("exact", "cell_acc", "parse_fail")


def _bucket_rank(bucket: str) -> tuple[int, str]:
    return (BUCKET_ORDER.index(bucket), "") if bucket in BUCKET_ORDER else (len(BUCKET_ORDER), str(bucket))


def proportion_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score (1 - alpha) interval of a proportion successes / n; (nan, nan) when n is 0.

    Unlike a percentile bootstrap it does not collapse at 0 and 1: 0 of 64 gives [0, 0.057] (the exact
    Clopper-Pearson upper bound is 0.056), where the bootstrap reports [0, 0]."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"proportion_ci: successes={successes} must lie in [0, n={n}]")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _tasks(rows: list[dict]) -> list[str]:
    """The tasks of report rows, "all" first (rows without a task count as "all")."""
    return sorted({r.get("task", "all") for r in rows}, key=lambda t: (t != "all", t))


def aggregate(records: list[dict], timings: dict[tuple[str, str, int], dict]) -> list[dict]:
    """One row per (model, sampler, task, bucket, steps), bucket "all" plus each bucket present; task "all" plus,
    when the records come from several tasks (a mixture), each task; sorted, with plateau."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    several = len({r.get("task") for r in records}) > 1
    for r in records:
        key = (r["model"], r["sampler"], int(r["steps"]))
        for task in ("all", r.get("task")) if several else ("all",):
            groups[(*key, task, "all")].append(r)
            if r.get("bucket") is not None:
                groups[(*key, task, r["bucket"])].append(r)
    rows = []
    for (model, sampler, steps, task, bucket), recs in groups.items():
        solved = [float(r["solved"]) for r in recs]
        lo, hi = proportion_ci(int(round(sum(solved))), len(solved))
        t = timings.get((model, sampler, steps)) or {}
        seconds = float(t.get("seconds") or 0.0)
        tps = float(t.get("tokens", 0)) / seconds if seconds > 0 else 0.0
        row = {"model": model, "sampler": sampler, "task": task, "bucket": bucket, "steps": steps, "n": len(recs),
               "solved": _mean(solved), "solved_lo": lo, "solved_hi": hi}
        for k in _MEAN_KEYS:  # rows where a grade is undefined (None: exact without a reference) are left out
            row[k] = _mean([float(r[k]) for r in recs if r.get(k) is not None])
        row["mean_nfe"] = _mean([float(r.get("nfe", math.nan)) for r in recs])
        row["tokens_per_s"] = tps
        rows.append(row)
    rows.sort(key=lambda r: (str(r["model"]), str(r["sampler"]), r["task"] != "all", r["task"],
                             _bucket_rank(r["bucket"]), r["steps"]))
    return add_steps_to_plateau(rows)


def add_steps_to_plateau(rows: list[dict]) -> list[dict]:
    """Set `steps_to_plateau` per (model, sampler, task, bucket): fewest steps with solved >= 0.95 * max (None if
    max is 0)."""
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        series[(r["model"], r["sampler"], r.get("task", "all"), r["bucket"])].append(r)
    for rs in series.values():
        vals = [r["solved"] for r in rs if r["solved"] is not None and not math.isnan(r["solved"])]
        best = max(vals, default=0.0)
        plateau = None
        if best > 0:
            plateau = min(r["steps"] for r in rs
                          if r["solved"] is not None and not math.isnan(r["solved"]) and r["solved"] >= 0.95 * best)
        for r in rs:
            r["steps_to_plateau"] = plateau
    return rows


def _fmt(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def format_table(rows: list[dict], bucket: str | None = None, task: str | None = None) -> str:
    """Markdown table of `rows` (only those of `bucket` / `task` when given)."""
    header = ["model", "sampler", "bucket", "steps", "n", "solved [lo, hi]", "exact", "cell_acc",
              "parse_fail", "mean_nfe", "tokens/s", "steps_to_plateau"]
    with_task = task is None and len(_tasks(rows)) > 1  # several tasks in one table: say which
    if with_task:
        header.insert(2, "task")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if (bucket is not None and r["bucket"] != bucket) or (task is not None and r.get("task", "all") != task):
            continue
        solved = f"{_fmt(r['solved'])} [{_fmt(r['solved_lo'], 2)}, {_fmt(r['solved_hi'], 2)}]"
        plateau = r.get("steps_to_plateau")
        cells = [r["model"], r["sampler"], r["bucket"], r["steps"], r["n"], solved, _fmt(r["exact"]),
                 _fmt(r["cell_acc"]), _fmt(r["parse_fail"]), _fmt(r["mean_nfe"], 1), _fmt(r["tokens_per_s"], 1),
                 "-" if plateau is None else plateau]
        if with_task:
            cells.insert(2, r.get("task", "all"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _buckets(rows: list[dict]) -> list[str]:
    return sorted({r["bucket"] for r in rows}, key=_bucket_rank)


def steps_axis(ax, steps: list[int]) -> None:
    """An accuracy-vs-steps axes: the step counts as ticks on a log2 x axis (linear when one is 0), accuracy in
    [0, 1], a light grid."""
    if steps and min(steps) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(s) for s in steps])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("denoising steps")
    ax.grid(alpha=0.3)


def plot_accuracy_vs_steps(rows: list[dict], path) -> None:
    """Plot solved (solid, CI band) and cell_acc (dashed) vs steps, one subplot per bucket (one row of subplots per
    task when the rows hold several); save PNG to `path`."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no INFO lines on normal runs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(rows) or ["all"]
    panels = [(t, b) for t in tasks for b in _buckets([r for r in rows if r.get("task", "all") == t])] or [("all", "all")]
    cols = max(sum(p[0] == t for p in panels) for t in tasks)
    fig, axes = plt.subplots(len(tasks), cols, figsize=(5 * cols, 4 * len(tasks)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    series_keys = sorted({(r["model"], r["sampler"]) for r in rows})
    colors = {k: f"C{i % 10}" for i, k in enumerate(series_keys)}
    all_steps = sorted({r["steps"] for r in rows})
    for (task, bucket) in panels:
        ax = axes[tasks.index(task)][[p for p in panels if p[0] == task].index((task, bucket))]
        ax.set_visible(True)
        for key in series_keys:
            rs = sorted((r for r in rows if r["bucket"] == bucket and r.get("task", "all") == task
                         and (r["model"], r["sampler"]) == key), key=lambda r: r["steps"])
            if not rs:
                continue
            xs = [r["steps"] for r in rs]
            nan = lambda v: math.nan if v is None else v  # noqa: E731
            label = f"{key[0]} / {key[1]}"
            ax.plot(xs, [nan(r["solved"]) for r in rs], "-o", color=colors[key], label=f"{label} solved")
            ax.fill_between(xs, [nan(r["solved_lo"]) for r in rs], [nan(r["solved_hi"]) for r in rs],
                            color=colors[key], alpha=0.2)
            ax.plot(xs, [nan(r["cell_acc"]) for r in rs], "--", color=colors[key], label=f"{label} cell_acc")
        steps_axis(ax, all_steps)
        ax.set_ylabel("accuracy")
        ax.set_title(f"bucket: {bucket}" if len(tasks) == 1 else f"task: {task}, bucket: {bucket}")
        ax.legend(fontsize="small")
    fig.suptitle("Accuracy vs denoising steps")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _clean(obj):
    """Recursively replace NaN/inf with None and numpy scalars with Python ones, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(run_dir, rows: list[dict], meta: dict) -> dict[str, Path]:
    """Write report.json, report.md and accuracy_vs_steps.png atomically into `run_dir`; return their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "png": run_dir / "accuracy_vs_steps.png"}

    text = json.dumps(_clean({"meta": meta, "rows": rows}), indent=2, allow_nan=False, default=str)
    _atomic_write(paths["json"], lambda f: f.write((text + "\n").encode()))

    md = ["# dgtune report: accuracy vs denoising steps", ""]
    md += [f"- **{k}**: " + (", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else f"{v}")
           for k, v in meta.items()]
    tasks = _tasks(rows)
    for task in tasks:  # one section per task when the run covers several (a mixture), "all" first
        task_rows = [r for r in rows if r.get("task", "all") == task]
        if len(tasks) > 1:
            md += ["", f"## Task: {task}"]
        for bucket in _buckets(task_rows):
            md += ["", f"{'###' if len(tasks) > 1 else '##'} Bucket: {bucket}", "", format_table(task_rows, bucket)]
    md += ["", f"![accuracy vs steps]({paths['png'].name})", ""]
    _atomic_write(paths["md"], lambda f: f.write("\n".join(md).encode()))

    _atomic_write(paths["png"], lambda f: plot_accuracy_vs_steps(rows, f))
    return paths
