"""What a sweep optimises, and the pieces that let Hydra's Optuna sweeper and W&B sweeps drive `dgtune.train`.

- **The objective** (`sweep.metric`, e.g. `solved@4`; `auto`: `solved` at the first of `eval.quick_steps`): a grade
  of `task.grade` at a step count, measured at the end of training on the **validation** split (the first
  `sweep.val_n` rows; null = all) with the run's sampler, never on the test split. `train(cfg)` returns it in its
  summary, the Hydra entry point returns its value (what `hydra/sweeper=optuna` reads), it is written to
  `RUN_DIR/objective.json`, to the report's `meta.objective`, and logged as `sweep/objective` (what a W&B sweep's
  `metric.name` reads).
- **Resuming a sweep**: `trials_left(total, storage, study)` (the OmegaConf resolver `dgtune_trials_left`) is the
  number of trials a study stored in `storage` still needs to reach `total` finished trials, so rerunning an
  interrupted sweep's command runs only the missing trials (the Optuna sweeper itself would run `n_trials` more).
- **The best trial's command**: `SweepSummary`, a Hydra callback, prints it when the sweep ends and writes
  `best.json` beside Optuna's `optimization_results.yaml`.

Sweep configs: `configs/sweeper/*.yaml` (`python -m dgtune.train -m recipe=sudoku_4x4 +sweeper=optuna_sudoku_4x4`),
`sweeps/*.yaml` for `wandb sweep`. Comparing the runs: `python -m dgtune.compare SWEEP_FOLDER`.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from hydra.experimental.callback import Callback

from dgtune.errors import ConfigError

METRIC = re.compile(r"^(?P<grade>[a-z_]+)@(?P<steps>\d+)$")
GRADES = ("solved", "cell_acc", "exact")  # grades a sweep can optimise (the higher the better)


def objective_spec(cfg) -> tuple[str, int]:
    """(grade, step count) named by `sweep.metric` (ConfigError naming the key for a bad value)."""
    sweep = cfg.get("sweep") or {}
    metric = str(sweep.get("metric", "auto") or "auto")
    if metric == "auto":
        return "solved", int(list(cfg.eval.quick_steps)[0])
    m = METRIC.match(metric)
    if not m or m["grade"] not in GRADES or int(m["steps"]) < 1:
        raise ConfigError(f"sweep.metric={metric!r}: expected <grade>@<steps> with grade one of {', '.join(GRADES)} "
                          "and steps >= 1 (e.g. solved@4), or auto")
    return m["grade"], int(m["steps"])


def validation_objective(model, tokenizer, task, val_rows: list[dict], cfg) -> dict:
    """The run's objective (module docstring) on the validation rows: {"metric": "val/<grade>@<steps>", "value",
    "n", "direction": "maximize"}."""
    from dgtune.eval.runner import evaluate
    from dgtune.sampling.config import sampler_config

    grade, steps = objective_spec(cfg)
    n = (cfg.get("sweep") or {}).get("val_n")
    rows = val_rows[: int(n)] if n else list(val_rows)
    if not rows:
        raise ConfigError("sweep.metric: the validation split is empty (raise task.n_val)")
    records, _ = evaluate(model, tokenizer, task, rows, [steps], sampler_config(cfg), cfg.eval.batch_size, cfg.seed,
                          "tuned")
    value = sum(float(r[grade] or 0.0) for r in records) / len(records)
    return {"metric": f"val/{grade}@{steps}", "value": value, "n": len(records), "direction": "maximize"}


def trials_left(total, storage, study_name) -> int:
    """Trials still needed for `total` finished (complete, pruned or failed) trials of the Optuna study
    `study_name` in `storage` (a database URL; none or no such study yet: all of them)."""
    total = int(total)
    if not storage or str(storage) in ("None", "null"):
        return total
    import optuna

    try:
        study = optuna.load_study(study_name=str(study_name), storage=str(storage))
    except KeyError:  # no such study yet
        return total
    done = [t for t in study.trials if t.state.is_finished()]
    return max(total - len(done), 0)


def sqlite_url(path) -> str:
    """`sqlite:///<path>` for an Optuna study database, its folder created (SQLite does not create folders)."""
    Path(str(path)).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def register_resolvers() -> None:
    """The OmegaConf resolvers of the sweeper configs: `dgtune_trials_left` (`trials_left`) and `dgtune_sqlite`
    (`sqlite_url`)."""
    from omegaconf import OmegaConf

    for name, fn in (("dgtune_trials_left", trials_left), ("dgtune_sqlite", sqlite_url)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=False)


def best_command(task_overrides: list[str], best_params: dict) -> str:
    """The command line of the best trial: the sweep's fixed overrides (its sweeper choice and search ranges left
    out) followed by the best parameters."""
    def sweep_only(key: str) -> bool:  # the sweeper's choice and size, Hydra's own settings
        return key.startswith(("sweeper", "hydra.", "hydra/")) or key == "sweep.trials"

    keep = [o for o in task_overrides
            if not sweep_only(o.split("=", 1)[0].lstrip("+~")) and o.split("=", 1)[0].lstrip("+~") not in best_params]
    best = [f"{k}={v}" for k, v in best_params.items()]
    return "python -m dgtune.train " + " ".join(shlex.quote(o) for o in keep + best)


class SweepSummary(Callback):
    """Hydra callback: when a sweep whose sweeper wrote `optimization_results.yaml` ends, print the best trial's
    value and command line and write them to `<sweep dir>/best.json`."""

    def on_multirun_end(self, config, **kwargs) -> None:
        """Print and record the best trial of the sweep that just ended."""
        from omegaconf import OmegaConf

        sweep_dir = Path(config.hydra.sweep.dir)
        results = sweep_dir / "optimization_results.yaml"
        if not results.is_file():
            return
        res = OmegaConf.to_container(OmegaConf.load(results))
        if "best_params" not in res:
            return
        overrides = list(config.hydra.overrides.task)
        best = {"value": res["best_value"], "params": res["best_params"],
                "command": best_command(overrides, res["best_params"])}
        from dgtune.checkpoint import write_json

        write_json(sweep_dir / "best.json", best)
        print(f"[dgtune] sweep best: {best['value']:.4f} ({json.dumps(res['best_params'])})\n"
              f"[dgtune] best trial's command: {best['command']}")
