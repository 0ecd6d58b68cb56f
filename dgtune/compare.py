"""Compare many runs (a sweep's trials, or any run folders) in one table and one plot.

    python -m dgtune.compare RUN_DIR_OR_SWEEP_FOLDER... [--out OUT_DIR] [--wandb PROJECT]

Each argument is a run folder (it holds `report.json`) or a folder holding run folders (a sweep's `runs_root`;
searched two levels deep). Writes `OUT_DIR/compare.md` (runs sorted by their objective, best first: the
validation figure a sweeper optimised, `RUN_DIR/objective.json`; then the settings in which the runs differ, the
tuned model's solved rate [Wilson interval] and cell accuracy on the test split at each step count of the reports,
and training minutes), `compare.json` (the same, as data) and `compare.png` (solved and cell accuracy against
denoising steps, one line per run). `--wandb PROJECT` also logs the table and the plot to a W&B run (offline
without an API key). OUT_DIR defaults to the single folder given, else the current folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from dgtune.errors import InputError

IGNORED = ("run_dir", "run_name", "runs_root", "data_dir", "resume", "logger.", "hydra.", "sweep.trials")  # bookkeeping


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (with `report.json`) among `paths` and their children and grandchildren, each once, sorted."""
    found = set()
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise InputError(f"{p}: no such folder")
        if (p / "report.json").is_file():
            found.add(p.resolve())
            continue
        found.update(r.parent.resolve() for r in list(p.glob("*/report.json")) + list(p.glob("*/*/report.json")))
    if not found:
        raise InputError(f"no run folder with a report.json in {', '.join(map(str, paths))} (runs that evaluated "
                         "at the end of training have one)")
    return sorted(found)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def load_run(run_dir: Path) -> dict:
    """What the comparison reads of one run: name, config (flat), report rows of the tuned model (bucket all),
    objective (or None) and training minutes."""
    from omegaconf import OmegaConf

    try:
        report = json.loads((run_dir / "report.json").read_text())
    except ValueError as e:
        raise InputError(f"{run_dir / 'report.json'}: not JSON ({e})") from None
    cfg = {}
    if (run_dir / "config.yaml").is_file():
        cfg = _flat(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False))
    objective = None
    if (run_dir / "objective.json").is_file():
        objective = json.loads((run_dir / "objective.json").read_text())
    meta = report.get("meta", {})
    rows = [r for r in report.get("rows", []) if r.get("model") == "tuned" and r.get("bucket", "all") == "all"
            and r.get("task", "all") == "all"]
    return {"name": run_dir.name, "dir": str(run_dir), "config": cfg, "rows": sorted(rows, key=lambda r: r["steps"]),
            "objective": objective, "train_minutes": meta.get("train_minutes")}


def differing(runs: list[dict]) -> list[str]:
    """The config keys whose values differ between the runs (bookkeeping keys left out)."""
    keys = sorted({k for r in runs for k in r["config"]})
    keys = [k for k in keys if not any(k == i or k.startswith(i) for i in IGNORED)]
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True, default=str) for r in runs}) > 1]


def _objective_key(run: dict) -> float:
    obj = run["objective"]
    return -math.inf if obj is None or obj.get("value") is None else float(obj["value"])


def _setting(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(runs: list[dict], keys: list[str]) -> str:
    """The Markdown table (runs in the given order)."""
    steps = sorted({r["steps"] for run in runs for r in run["rows"]})
    metrics = sorted({run["objective"]["metric"] for run in runs if run["objective"]})
    header = ["#", "run", f"objective ({', '.join(metrics) or '-'})", *keys,
              *[f"solved@{s} [lo, hi]" for s in steps], *[f"cell_acc@{s}" for s in steps], "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, run in enumerate(runs, 1):
        by = {r["steps"]: r for r in run["rows"]}
        obj = run["objective"]
        cells = [i, run["name"], "-" if obj is None else f"{obj['value']:.3f} (n={obj.get('n')})",
                 *[_setting(run["config"].get(k, "-")) for k in keys],
                 *[f"{by[s]['solved']:.3f} [{by[s]['solved_lo']:.2f}, {by[s]['solved_hi']:.2f}]" if s in by else "-"
                   for s in steps],
                 *[f"{by[s]['cell_acc']:.3f}" if s in by else "-" for s in steps],
                 "-" if run["train_minutes"] is None else f"{run['train_minutes']:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_runs(runs: list[dict], path: Path) -> None:
    """Solved (solid, Wilson band) and cell accuracy (dashed) against denoising steps, one colour per run (best
    objective first), the legend beside the axes; written atomically to `path`."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgtune.eval.report import steps_axis

    fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(13, 4.5))
    steps = sorted({r["steps"] for run in runs for r in run["rows"]})
    for i, run in enumerate(runs):
        rs, color = run["rows"], f"C{i % 10}"
        xs = [r["steps"] for r in rs]
        obj = run["objective"]
        label = f"{i + 1}. {run['name']}" + ("" if obj is None else f" ({obj['value']:.3f})")
        ax_s.plot(xs, [r["solved"] for r in rs], "-o", color=color, label=label)
        ax_s.fill_between(xs, [r["solved_lo"] for r in rs], [r["solved_hi"] for r in rs], color=color, alpha=0.12)
        ax_c.plot(xs, [r["cell_acc"] for r in rs], "--o", color=color)
    for ax, what in ((ax_s, "solved (test split, Wilson 95%)"), (ax_c, "cell_acc (test split)")):
        steps_axis(ax, steps)
        ax.set_title(what)
    fig.legend(*ax_s.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.78, 0.5), fontsize="small",
               title="run (objective)")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")  # the legend beside the axes included
    plt.close(fig)
    os.replace(tmp, path)


def compare(paths: list[Path], out: Path | None = None, wandb_project: str | None = None) -> dict:
    """Write the comparison of the runs in `paths` (module docstring); returns {"md", "json", "png"} paths."""
    from dgtune.checkpoint import write_json

    runs = sorted((load_run(p) for p in find_runs(paths)), key=lambda r: (-_objective_key(r), r["name"]))
    keys = differing(runs)
    out = Path(out) if out is not None else (Path(paths[0]) if len(paths) == 1 else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs, keys)
    paths_out = {"md": out / "compare.md", "json": out / "compare.json", "png": out / "compare.png"}
    tmp = paths_out["md"].with_name(".compare.md.tmp")
    tmp.write_text(f"# {len(runs)} runs, best objective first\n\n{md}\n\nRuns: " +
                   ", ".join(f"`{r['dir']}`" for r in runs) + "\n")
    os.replace(tmp, paths_out["md"])
    write_json(paths_out["json"], [{"run": r["name"], "dir": r["dir"], "objective": r["objective"],
                                   "settings": {k: r["config"].get(k) for k in keys}, "rows": r["rows"],
                                   "train_minutes": r["train_minutes"]} for r in runs])
    plot_runs(runs, paths_out["png"])
    if wandb_project:
        _to_wandb(wandb_project, runs, keys, paths_out)
    print(md)
    print(f"[dgtune] compare: {paths_out['md']}, {paths_out['png']}")
    return paths_out


def _to_wandb(project: str, runs: list[dict], keys: list[str], paths: dict) -> None:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, job_type="compare", mode=mode, dir=str(paths["md"].parent))
    cols = ["run", "objective", *keys, "train_minutes"]
    data = [[r["name"], None if r["objective"] is None else r["objective"]["value"],
             *[str(r["config"].get(k)) for k in keys], r["train_minutes"]] for r in runs]
    run.log({"compare/table": wandb.Table(columns=cols, data=data), "compare/plot": wandb.Image(str(paths["png"]))})
    run.finish()


def main(argv=None) -> int:
    """`python -m dgtune.compare`."""
    from dgtune.validate import cli_errors

    ap = argparse.ArgumentParser(prog="python -m dgtune.compare", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding them (a sweep's runs_root)")
    ap.add_argument("--out", type=Path, default=None, help="where to write compare.md/.json/.png")
    ap.add_argument("--wandb", metavar="PROJECT", default=None, help="also log the table and plot to W&B")
    args = ap.parse_args(argv)
    with cli_errors():
        compare(args.paths, args.out, args.wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
