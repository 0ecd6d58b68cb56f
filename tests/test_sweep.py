"""Sweeps (dgtune/sweep.py, dgtune/compare.py): the objective a sweeper reads, an Optuna sweep through the real CLI
(trials, resume, best command), the W&B sweep file, and the comparison of many runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dgtune.config import compose
from dgtune.errors import ConfigError
from dgtune.sweep import best_command, objective_spec, trials_left

ROOT = Path(__file__).resolve().parents[1]


def test_objective_spec_reads_sweep_metric():
    """`auto` is solved at the recipe's first quick-eval step count; a bad metric is a ConfigError naming the key."""
    assert objective_spec(compose(["recipe=sudoku_4x4"])) == ("solved", 4)
    assert objective_spec(compose(["sweep.metric=cell_acc@8"])) == ("cell_acc", 8)
    for bad in ("solved", "loss@4", "solved@0"):
        with pytest.raises(ConfigError, match="sweep.metric="):
            objective_spec(compose([f"sweep.metric={bad}"]))


def test_trials_left_counts_the_finished_trials_of_a_stored_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert trials_left(5, url, "s") == 5 and trials_left(5, None, "s") == 5  # no study yet / no storage
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for v in (0.1, 0.2):
        study.tell(study.ask(), v)
    study.ask()  # an interrupted trial (still RUNNING) is run again
    assert trials_left(5, url, "s") == 3 and trials_left(2, url, "s") == 0


def test_best_command_replaces_the_search_with_the_best_values():
    cmd = best_command(["recipe=sudoku_4x4", "+sweeper=optuna_sudoku_4x4", "sweep.trials=6", "trainer.max_steps=10",
                        "lora.r=8"],
                       {"trainer.lr": 0.002, "lora.r": 16})
    assert cmd == "python -m dgtune.train recipe=sudoku_4x4 trainer.max_steps=10 trainer.lr=0.002 lora.r=16"


def test_wandb_sweep_file_composes_and_reads_the_logged_objective():
    """Every parameter of the W&B sweep is a key of the composed config, and the command's fixed overrides compose."""
    spec = yaml.safe_load((ROOT / "sweeps" / "sudoku_4x4_wandb.yaml").read_text())
    assert spec["metric"]["name"] == "sweep/objective"  # what dgtune.hooks.finish logs
    fixed = [a for a in spec["command"] if "=" in a and not a.startswith("$")]
    cfg = compose(fixed)
    for key, p in spec["parameters"].items():
        value = p["values"][0] if "values" in p else p["min"]
        section, name = key.rsplit(".", 1)
        assert name in cfg[section], key
        compose([*fixed, f"{key}={value}"])


def test_runs_under_a_wandb_agent_are_grouped_by_sweep_id(monkeypatch):
    from dgtune.run_folder import sweep_group

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert sweep_group(compose([])) == "sweep-abc123"
    assert sweep_group(compose(["logger=wandb", "logger.group=mine"])) == "mine"


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled"}


@pytest.mark.slow
def test_optuna_sweep_resumes_and_compare_reads_its_runs(tmp_path):
    """A 3-trial Optuna sweep of a 10-step recipe=sudoku_4x4 through the real CLI, offline: the best trial's command is
    printed; each trial's value in the study equals its run's objective.json and its report's validation figure; a
    rerun of the same command runs no new trial; `dgtune.compare` on the sweep folder writes the table and plot."""
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    root = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dgtune.train", "recipe=sudoku_4x4", "+sweeper=optuna_sudoku_4x4", "sweep.trials=3",
           f"runs_root={root}", "trainer.max_steps=10", "task.n_val=16", "task.n_test=16", "eval.steps=[2,4]",
           "eval.compare_base=false", "eval.quick_every=0", "trainer.progress_bar=false", "data_dir=" + str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best trial's command: python -m dgtune.train recipe=sudoku_4x4" in out.stdout, out.stdout[-2000:]
    runs = sorted(p.parent for p in root.glob("*/report.json"))
    assert len(runs) == 3
    study = optuna.load_study(study_name="sudoku_4x4", storage=f"sqlite:///{root / 'optuna.db'}")
    trials = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) == 3
    by_params = {}
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        objective = json.loads((run / "objective.json").read_text())
        report = json.loads((run / "report.json").read_text())
        assert objective["metric"] == "val/solved@4" and objective["n"] == 16
        assert report["meta"]["objective"]["value"] == objective["value"]
        by_params[(round(cfg["trainer"]["lr"], 12), cfg["lora"]["r"])] = objective["value"]
    for t in trials:
        assert by_params[(round(t.params["trainer.lr"], 12), t.params["lora.r"])] == t.value
    best = json.loads((root / ".hydra" / "best.json").read_text())
    assert best["value"] == max(t.value for t in trials)

    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list(root.glob("*/report.json"))) == 3 and "best trial's command" in again.stdout

    res = subprocess.run([sys.executable, "-m", "dgtune.compare", str(root), "--wandb", "dgtune-test"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (root / "compare.md").read_text()
    assert (root / "compare.png").stat().st_size > 0
    lines = [x for x in md.splitlines() if x.startswith("| ") and x[2].isdigit()]
    assert len(lines) == 3 and "trainer.lr" in md and "solved@2 [lo, hi]" in md
    values = [float(x.split("|")[3].split()[0]) for x in lines]
    assert values == sorted(values, reverse=True)
