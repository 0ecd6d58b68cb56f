"""Fault injection, round two (issue 28): each probe a user met that ran the wrong job, overwrote weights, ended in
a traceback or reported a metric that lies. Every user-facing failure is one line `dgtune: error: ...` naming the
key, file, row or function, exit code 2, and nothing is left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgtune.config import compose
from dgtune.validate import cli_errors

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = ROOT / "dgtune" / "assets" / "tiny-diffusiongemma"
pytestmark = [pytest.mark.trains,
              pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").exists(), reason="bundled base not built")]

SMALL = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.progress_bar=false", "eval.quick_every=0",
         "eval.steps=[1]", "eval.batch_size=8", "eval.compare_base=false", "trainer.warmup_steps=1"]
VERIFIERS = '''
import math

def ok(row, output):
    return output == row["response"]

def boom(row, output):
    if row["prompt"].endswith("3"):
        raise RuntimeError("cannot parse " + output)
    return True

def nan(row, output):
    return {"solved": math.nan}

def five(row, output):
    return {"solved": 5}

def extra(row, output):
    return {"solved": 1.0, "score": 0.5}
'''


def one_line_error(capsys, fn, *args) -> str:
    """Run `fn(*args)` as a command-line entry point does (`cli_errors`): the exit code must be 2 and stderr one
    line `dgtune: error: ...`; returns that line."""
    with pytest.raises(SystemExit) as e:
        with cli_errors():
            fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dgtune: error: "), err
    return err[0]


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """A 16-row JSONL task (`rev:` digits), a verifier module on sys.path, and a config builder for task=data."""
    rows = [{"prompt": f"rev:{i}{i + 1}{i + 2}", "response": f"{i + 2}{i + 1}{i}"} for i in range(1, 9)] * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp_path / "my_verifiers.py").write_text(VERIFIERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_verifiers", None)

    def cfg(*overrides):
        return compose(["task=data", f"task.files.train={tmp_path / 'train.jsonl'}",
                        f"task.files.test={tmp_path / 'test.jsonl'}", "task.canvas_length=8", "task.n_val=2",
                        *SMALL, f"runs_root={tmp_path / 'runs'}", f"data_dir={tmp_path / 'cache'}", *overrides])

    return tmp_path, cfg


def nothing_left(tmp_path) -> bool:
    runs = tmp_path / "runs"
    return not runs.exists() or not [p for p in runs.iterdir() if p.name != ".hydra"]


def train(cfg):
    from dgtune.train import train as train_fn

    return train_fn(cfg)


# ---- 1: an unknown recipe (or group option) is an error, not the default job -------------------------------

def test_unknown_recipe_and_group_option_fail_before_anything_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for arg, named in (("recipe=nosuch", "recipe='nosuch'"), ("task=sudoku5", "task='sudoku5'")):
        proc = subprocess.run([sys.executable, "-m", "dgtune.train", arg, f"runs_root={tmp_path}/runs"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and named in err[0] and "available: " in err[0], proc.stderr
        assert not (tmp_path / "runs").exists()
    from dgtune.validate import check_overrides

    check_overrides(["recipe=sudoku_4x4", "task=sudoku4,countdown", "trainer.lr=1e-3", "-m"])  # all exist: fine


# ---- 2: export never overwrites weights without --overwrite --------------------------------------------------

def test_export_refuses_to_overwrite_weights_without_overwrite(tmp_path, capsys):
    from dgtune.export import main as export_main

    run = tmp_path / "run"
    train(compose(["task=sudoku4", "task.n_train=8", "task.n_val=2", "task.n_test=2", *SMALL, "eval.at_end=false",
                   f"run_dir={run}", f"data_dir={tmp_path / 'cache'}"]))
    out = tmp_path / "out"
    export_main([str(run), str(out)])
    before = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(before[:-1] + b"\0")  # someone's weights, not this run's
    mine = (out / "adapter_model.safetensors").read_bytes()
    line = one_line_error(capsys, export_main, [str(run), str(out)])
    assert str(out) in line and "adapter_model.safetensors" in line and "--overwrite" in line
    assert (out / "adapter_model.safetensors").read_bytes() == mine  # untouched
    export_main([str(run), str(out), "--overwrite"])
    assert (out / "adapter_model.safetensors").read_bytes() == before


# ---- 3-9: a user's data files and settings -----------------------------------------------------------------

DATA_PROBES = {  # issue 28's probes 3-9: overrides (FILE stands for the test's folder) and what the line must name
    "3_no_response_column": (["task.files.train=FILE/noresp.jsonl", "task.files.test=FILE/noresp.jsonl"],
                             ["noresp.jsonl", "no column 'response'", "'answer'"]),  # the file's columns are listed
    "4_mapped_column_missing": (["task.columns.prompt=question"], [".jsonl", "no column 'question'", "task.columns.prompt"]),
    "5_chat_not_ending_with_assistant": (["task.files.train=FILE/chat.jsonl", "task.files.test=FILE/chat.jsonl",
                                          "task.columns.messages=messages"], ["chat.jsonl", "row 1", "last message"]),
    "6_verifier_module_missing": (["task.verifier=no_such_module:check"], ["task.verifier", "no_such_module"]),
    "6_verifier_function_missing": (["task.verifier=my_verifiers:missing"], ["task.verifier", "my_verifiers", "'missing'"]),
    "7_corrupt_parquet": (["task.files.train=FILE/bad.parquet"], ["bad.parquet"]),
    "8_empty_file": (["task.files.train=FILE/empty.jsonl"], ["empty.jsonl", "empty"]),
    "9_answer_longer_than_the_canvas": (["task.files.train=FILE/long.jsonl"], ["long.jsonl", "canvas"]),  # 13 + EOS > 8
}


@pytest.mark.parametrize("probe", sorted(DATA_PROBES))
def test_data_faults_are_one_line_errors_and_leave_no_run_folder(data, capsys, probe):
    tmp, cfg = data
    (tmp / "noresp.jsonl").write_text('{"prompt": "rev:1", "answer": "1"}\n')
    (tmp / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"},
                                                             {"role": "user", "content": "x"}]}) + "\n")
    (tmp / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    (tmp / "empty.jsonl").write_text("")
    long_rows = [{"prompt": "rev:1", "response": "1234567890123"}] * 4
    (tmp / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    overrides, named = DATA_PROBES[probe]
    line = one_line_error(capsys, train, cfg(*(o.replace("FILE", str(tmp)) for o in overrides)))
    assert all(n in line for n in named), line
    assert nothing_left(tmp), sorted((tmp / "runs").iterdir())


# ---- 10-12: verifiers that raise or return bad grades ---------------------------------------------------------

@pytest.fixture()
def verifier_run(data):
    """A 2-step run of the data task with a plain verifier, no report."""
    tmp, cfg = data
    train(cfg("task.verifier=my_verifiers:ok", "eval.at_end=false", f"run_dir={tmp / 'run'}"))
    return tmp, tmp / "run"


@pytest.mark.parametrize("name, named", [
    ("boom", ["my_verifiers:boom", "RuntimeError", "cannot parse", "row"]),  # 10: raises on one row
    ("nan", ["my_verifiers:nan", "solved", "nan", "row"]),  # 11: NaN
    ("five", ["my_verifiers:five", "solved", "5", "row"]),  # 12: outside [0, 1]
    ("extra", ["my_verifiers:extra", "'score'"]),  # a key other than the agreed four
])
def test_a_failing_verifier_is_named_with_the_row(verifier_run, capsys, name, named):
    from dgtune.eval.__main__ import main as eval_main

    tmp, run = verifier_run
    line = one_line_error(capsys, eval_main, [str(run), f"task.verifier=my_verifiers:{name}", f"eval.out_dir={tmp / 'ev'}"])
    assert all(n in line for n in named), line
    assert not (tmp / "ev" / "report.json").exists()


def test_verifier_errors_can_be_counted_as_wrong(verifier_run):
    from dgtune.eval.__main__ import main as eval_main

    tmp, run = verifier_run
    report = eval_main([str(run), "task.verifier=my_verifiers:boom", "eval.on_verifier_error=count",
                        "eval.steps=[1,2]", f"eval.out_dir={tmp / 'ev'}"])
    meta = json.loads(Path(report).read_text())["meta"]
    assert meta["verifier_errors"] == 2  # the one test row whose prompt ends in '3' (rev:123), at each of 2 step counts


# ---- 13: a sampler setting that does not exist stops before training ----------------------------------------

def test_unknown_sampler_strategy_is_refused_before_training(tmp_path, capsys):
    line = one_line_error(capsys, train, compose(["task=sudoku4", *SMALL, "sampler.strategy=nosuch",
                                                  f"runs_root={tmp_path / 'runs'}"]))
    assert "sampler.strategy='nosuch'" in line and "topk_margin" in line
    assert nothing_left(tmp_path)


# ---- 14-15: a run folder that cannot be created -----------------------------------------------------------------

@pytest.mark.parametrize("where", ["/proc/dgtune_run", "/sys/dgtune_run"])
def test_run_dir_that_cannot_be_created_says_so(tmp_path, capsys, where):
    if not Path(where).parent.is_dir():
        pytest.skip(f"{Path(where).parent} does not exist here")
    line = one_line_error(capsys, train, compose(["task=sudoku4", *SMALL, f"run_dir={where}",
                                                  f"data_dir={tmp_path / 'cache'}"]))
    assert f"run_dir={where}" in line and "cannot be created" in line


# ---- 16: no reference, no exact -------------------------------------------------------------------------------

def test_rows_without_a_reference_have_no_exact_rate(tmp_path):
    from dgtune.eval.__main__ import main as eval_main

    run = tmp_path / "run"
    train(compose(["task=countdown", "task.n_train=8", "task.n_val=2", "task.n_test=2", *SMALL, "eval.at_end=false",
                   f"run_dir={run}", f"data_dir={tmp_path / 'cache'}"]))
    prompts = tmp_path / "cd3.txt"
    prompts.write_text("countdown:24;3,4,2\ncountdown:15;5,3,9\n")  # d1-style prompts: no reference answers
    report = eval_main([str(run), f"task.test_file={prompts}", "eval.steps=[1,2]", f"eval.out_dir={tmp_path / 'ev'}"])
    rows = json.loads(Path(report).read_text())["rows"]
    assert rows and all(r["exact"] is None for r in rows)  # undefined, never an empty output counted as exact
    table = (Path(report).parent / "report.md").read_text()
    assert "| tuned | entropy_bound | all | 1 | 2 |" in table and "| - |" in table
