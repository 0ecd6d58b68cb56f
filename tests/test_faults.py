"""Fault injection (issue 13): every bad input or fault a user can meet gets a clear error naming the problem, or a
safe recovery, and no existing file is changed or lost. Tiny settings (4x4 Sudoku, a few steps), mostly in-process."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dgtune.config import compose
from dgtune.validate import CheckpointError, ConfigError, InputError, NonFiniteError, RunLockedError, SaveError

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = ROOT / "dgtune" / "assets" / "tiny-diffusiongemma"
pytestmark = [pytest.mark.trains, pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").exists(), reason="bundled base not built")]

SMALL = ["task=sudoku4", "trainer.max_steps=2", "trainer.batch_size=4", "task.n_train=16", "task.n_val=4", "task.n_test=4", "eval.steps=[1]",
         "eval.quick_every=0", "eval.batch_size=8", "trainer.progress_bar=false", "trainer.log_every=1",
         "trainer.warmup_steps=1"]
PUZZLE4 = "1200000000000034"  # a 4x4 puzzle with several solutions (4 givens)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def config(tmp_path, data_dir, *overrides):
    return compose([*SMALL, f"runs_root={tmp_path}/runs", f"data_dir={data_dir}", *overrides])


def train(tmp_path, data_dir, *overrides):
    from dgtune.train import train as train_fn

    return train_fn(config(tmp_path, data_dir, *overrides))


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def no_run_folder(tmp_path) -> bool:
    runs = tmp_path / "runs"
    return not runs.exists() or not [p for p in runs.iterdir() if p.name != ".hydra"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    """A finished 3-step LoRA run with a checkpoint per step (the newest 2 kept) and its end-of-training report."""
    tmp = tmp_path_factory.mktemp("finished")
    summary = train(tmp, data_dir, "run_dir=" + str(tmp / "run"), "trainer.max_steps=3", "trainer.ckpt_every=1")
    return Path(summary["run_dir"])


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, data_dir):
    """A 4-step run that keeps all its checkpoints (step 1..4), no eval."""
    tmp = tmp_path_factory.mktemp("ckpts")
    train(tmp, data_dir, "run_dir=" + str(tmp / "run"), "trainer.max_steps=4", "trainer.ckpt_every=1",
          "trainer.keep_checkpoints=0", "eval.at_end=false")
    return tmp / "run"


# ---- the table ----------------------------------------------------------------------------------------

def test_nan_loss_stops_before_any_nan_is_saved(tmp_path, data_dir):
    with pytest.raises(NonFiniteError, match=r"not finite.*trainer\.lr"):
        train(tmp_path, data_dir, "run_dir=" + str(tmp_path / "run"), "trainer.lr=1e9", "trainer.max_steps=8",
              "trainer.ckpt_every=1", "trainer.keep_checkpoints=0", "eval.at_end=false")
    run = tmp_path / "run"
    assert not (run / "final").exists()
    from safetensors.torch import load_file

    for f in (run / "checkpoints").glob("step_*/weights/adapter_model.safetensors"):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(f)).values()), f
    assert not (run / ".dgtune.lock").exists()  # the lock is released on error


def test_nonfinite_step_is_skipped_with_on_nonfinite_skip(tmp_path, data_dir, monkeypatch):
    from dgtune.diffusion.loss import DenoisingLoss

    forward, calls = DenoisingLoss.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # step 2's loss is NaN
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(DenoisingLoss, "forward", poisoned)
    summary = train(tmp_path, data_dir, "run_dir=" + str(tmp_path / "run"), "trainer.max_steps=3",
                    "trainer.on_nonfinite=skip", "eval.at_end=false")
    run = Path(summary["run_dir"])
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("train/skipped_nonfinite")] == [2]
    from safetensors.torch import load_file

    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(run / "final/adapter_model.safetensors")).values())


def test_model_path_ignored_by_bundled_source_is_an_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"model\.name_or_path='/some/folder' is ignored by model\.source=bundled"):
        train(tmp_path, data_dir, "model.name_or_path=/some/folder")
    assert no_run_folder(tmp_path)


def test_unsolvable_and_multi_solution_puzzles_in_csv(tmp_path, data_dir, capsys):
    from dgtune.errors import SudokuFormatError

    bad = tmp_path / "unsolvable.csv"
    bad.write_text("puzzle,solution\n" + PUZZLE4 + ",\n" + "1200000000300040,\n")
    with pytest.raises(SudokuFormatError, match=r"unsolvable\.csv, line 3: puzzle has no solution"):
        train(tmp_path, data_dir, f"task.test_file={bad}")
    assert no_run_folder(tmp_path)
    from dgtune.tasks.sudoku.engine import read_csv

    multi = tmp_path / "multi.csv"
    multi.write_text("puzzle,solution\n" + PUZZLE4 + ",\n")
    assert len(read_csv(multi, 4)) == 1 and "1 puzzle(s) without a solution have several solutions" in capsys.readouterr().err


def test_header_only_csv_is_an_error(tmp_path, data_dir):
    from dgtune.errors import SudokuFormatError

    empty = tmp_path / "empty.csv"
    empty.write_text("puzzle,solution\n")
    with pytest.raises(SudokuFormatError, match=r"empty\.csv: no puzzle rows"):
        train(tmp_path, data_dir, f"task.test_file={empty}")
    assert no_run_folder(tmp_path)


@pytest.mark.parametrize("override,key", [("trainer.max_steps=abc", "trainer.max_steps='abc'"),
                                          ("trainer.lr=abc", "trainer.lr='abc'"),
                                          ("trainer.batch_size=0", "trainer.batch_size=0"),
                                          ("eval.steps=[0]", r"eval.steps=\[0\]")])
def test_bad_config_values_fail_before_any_folder(tmp_path, data_dir, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " is not allowed: expected"):
        train(tmp_path, data_dir, override)
    assert no_run_folder(tmp_path)


@pytest.mark.parametrize("overrides,key", [(["task=countdown", "eval.guided=true"], "eval.guided=true: task 'countdown'"),
                                           (["task=coloring", "objective.aux_weight=1"], "objective.aux_weight=1.0: task"),
                                           (["task=countdown", "+task.fresh=true"], "task.fresh=true: task 'countdown'")])
def test_setting_the_task_cannot_honour_fails_before_any_folder(tmp_path, data_dir, overrides, key):
    """eval.guided / objective.aux_weight / task.fresh on a task without a rule checker / auxiliary loss / generator:
    a one-line config error naming the key before any folder is made (guided crashed with an AttributeError after
    training; the other two were found only after the model was loaded)."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(tmp_path, data_dir, *overrides, "task.n_train=8", "task.n_val=2", "task.n_test=2")
    assert no_run_folder(tmp_path)


def test_bad_config_value_cli_exit_code_and_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dgtune.train", "task=sudoku4", "trainer.max_steps=abc"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dgtune: error: trainer.max_steps='abc' is not allowed")
    assert "Traceback" not in proc.stderr and no_run_folder(tmp_path)


@pytest.mark.parametrize("fault", ["optimizer_missing", "folder_deleted", "adapter_truncated", "optimizer_truncated"])
def test_resume_falls_back_to_newest_loadable_checkpoint(tmp_path, data_dir, ckpt_run, fault, capsys):
    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run)
    newest = run / "checkpoints" / "step_0000004"
    if fault == "optimizer_missing":
        (newest / "optimizer.pt").unlink()
    elif fault == "folder_deleted":
        shutil.rmtree(newest)
    elif fault == "adapter_truncated":
        f = newest / "weights" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    else:
        f = newest / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:1000])
    (run / "checkpoints" / ".tmp_step_0000005").mkdir()  # kill -9 during a checkpoint write leaves this behind
    older = snapshot(run / "checkpoints" / "step_0000003")
    summary = train(tmp_path, data_dir, f"run_dir={run}", "resume=true", "trainer.max_steps=4",
                    "trainer.ckpt_every=100", "trainer.keep_checkpoints=0", "eval.at_end=false")
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_0000004" in out and "resumed from" in out and "step 3" in out
    assert summary["steps"] == 4 and snapshot(run / "checkpoints" / "step_0000003") == older
    # with no loadable checkpoint at all: an error listing why each was skipped
    for p in (run / "checkpoints").glob("step_*"):
        (p / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*step_0000003: rng\.pt missing"):
        train(tmp_path, data_dir, f"run_dir={run}", "resume=true", "trainer.max_steps=5", "eval.at_end=false")


def test_corrupted_model_weights_fail_naming_the_file(tmp_path, data_dir):
    model_dir = tmp_path / "base"
    shutil.copytree(BUNDLED_DIR, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    with pytest.raises(InputError, match=str(weights)):
        train(tmp_path, data_dir, "model.source=pretrained", f"model.name_or_path={model_dir}")
    assert no_run_folder(tmp_path)


def test_second_process_on_a_run_folder_is_refused_and_stale_lock_taken_over(tmp_path, data_dir, capsys):
    from dgtune.run_folder import acquire_lock, release_lock

    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".dgtune.lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "since": "x"}))
        with pytest.raises(RunLockedError, match=f"in use by pid {live.pid}"):
            train(tmp_path, data_dir, f"run_dir={run}")
        assert [p.name for p in run.iterdir()] == [".dgtune.lock"]  # nothing written
    finally:
        live.kill()
        live.wait()
    lock = acquire_lock(run)  # the holder is gone (killed): taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid() and "stale lock" in capsys.readouterr().out
    release_lock(lock)
    assert not lock.exists()


def test_malformed_test_file_fails_before_training(tmp_path, data_dir):
    from dgtune.errors import SudokuFormatError

    bad = tmp_path / "bad.csv"
    bad.write_text("puzzle,solution\n" + PUZZLE4 + ",\n12x" + "0" * 13 + ",\n")
    with pytest.raises(SudokuFormatError, match=r"bad\.csv, line 3"):
        train(tmp_path, data_dir, f"task.test_file={bad}", "trainer.max_steps=2")
    assert no_run_folder(tmp_path)


def test_eval_writes_its_own_folder_unless_overwrite(finished_run, capsys):
    from dgtune.eval.__main__ import main as eval_main

    before = snapshot(finished_run)
    report = Path(eval_main([str(finished_run), "eval.steps=[1]", "eval.compare_base=false"]))
    assert report.parent.parent == finished_run and report.parent.name.startswith("eval-") and report.exists()
    assert {k: v for k, v in snapshot(finished_run).items() if not k.startswith("eval-")} == before
    assert "train_minutes" in json.loads((finished_run / "report.json").read_text())["meta"]
    with pytest.raises(SystemExit) as e:  # an existing report is never replaced without eval.overwrite=true
        eval_main([str(finished_run), f"eval.out_dir={report.parent}", "eval.steps=[1]"])
    assert e.value.code == 2 and "eval.overwrite=true" in capsys.readouterr().err


def test_export_is_portable_and_generate_matches_reference_mode(finished_run, tmp_path):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from dgtune.data import prompt_ids
    from dgtune.export import main as export_main
    from dgtune.sampling.sampler import SamplerConfig, sample

    export_main([str(finished_run), str(tmp_path / "adapter")])
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny-diffusiongemma"
    assert str(ROOT) not in (tmp_path / "adapter" / "adapter_config.json").read_text()
    export_main([str(finished_run), str(tmp_path / "adapter2"), "--base-model", "/models/base"])
    assert json.loads((tmp_path / "adapter2/adapter_config.json").read_text())["base_model_name_or_path"] == "/models/base"

    out = tmp_path / "merged"
    export_main([str(finished_run), str(out), "--merge"])
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] is not None and gen["max_new_tokens"] == 24 and gen["max_denoising_steps"] == 48
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(out)).eval()  # plain transformers client
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": "sudoku:" + PUZZLE4}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    torch.manual_seed(5)
    with torch.no_grad():
        ref = model.generate(**ids).sequences[:, ids["input_ids"].shape[1]:]
    ours = sample(model, torch.tensor([prompt_ids(tok, "sudoku:" + PUZZLE4)]), SamplerConfig(max_steps=48, mode="reference"),
                  torch.Generator().manual_seed(5), tok.eos_token_id, tok.pad_token_id, 24)
    assert ref.shape == ours.tokens.shape and torch.equal(ref, ours.tokens)


def test_reports_and_adapters_are_world_readable(finished_run):
    umask = os.umask(0)
    os.umask(umask)
    for f in ("report.json", "report.md", "accuracy_vs_steps.png", "final/adapter_model.safetensors",
              "final/generation_config.json"):
        assert (finished_run / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    for f in (finished_run / "checkpoints").rglob("*.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# ---- "Also seen" ------------------------------------------------------------------------------------------------

def test_keep_checkpoints_keeps_exactly_that_many(finished_run):
    assert sorted(p.name for p in (finished_run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]


def test_resume_does_not_duplicate_metrics(tmp_path, data_dir, ckpt_run):
    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run)
    # killed after step 4 was logged, before its checkpoint became the latest
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000003")
    train(tmp_path, data_dir, f"run_dir={run}", "resume=true", "trainer.max_steps=5", "trainer.ckpt_every=1",
          "eval.at_end=false")
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5]


def test_eval_sweep_shows_progress(finished_run, tmp_path, capsys):
    from dgtune.eval.__main__ import main as eval_main

    eval_main([str(finished_run), f"eval.out_dir={tmp_path / 'ev'}", "eval.steps=[1,2]", "trainer.progress_bar=true"])
    err = capsys.readouterr().err
    assert "eval tuned" in err and "eval base" in err and "steps=2" in err


def test_no_third_party_warning_spam(tmp_path, data_dir):
    import logging

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.INFO)  # as under Hydra, whose job logging shows INFO records
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(tmp_path, data_dir, "trainer.max_steps=1", "eval.compare_base=false")
        assert not logging.getLogger("matplotlib").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(level)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_sample_validates_and_prints_grid_with_verdict(finished_run, capsys):
    from dgtune.sample import main as sample_main

    for prompt, why in (("sudoku:" + "0" * 15, "length 15"), (PUZZLE4, "must start with 'sudoku:'")):
        with pytest.raises(SystemExit) as e:
            sample_main([str(finished_run), prompt])
        assert e.value.code == 2 and why in capsys.readouterr().err
    sample_main([str(finished_run), "sudoku:" + PUZZLE4, "sampler.max_steps=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("[dgtune] verdict: ")
    if "unparseable" not in lines[-1]:
        assert len(lines) >= 5 and all(len(x.split()) == 4 for x in lines[-5:-1])


def test_offline_error_suggests_the_hf_command(monkeypatch):
    from dgtune.models.load import ModelNotAvailableError, resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as e:
        resolve_model_path("someone/not-cached-model")
    assert "`hf download someone/not-cached-model`" in str(e.value) and "huggingface-cli" not in str(e.value)


# ---- issue item 6: disk full while checkpointing -------------------------------------------------------------------

def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(tmp_path, tiny, monkeypatch):
    from dgtune.checkpoint import latest_checkpoint, save_checkpoint

    model, tok = tiny
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, model, tok, opt, sched, {"tokens": 0}, keep=1)
    before = snapshot(tmp_path)
    real_save = torch.save

    def full(obj, f, *a, **k):
        if "optimizer" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SaveError, match=r"step_0000002 failed.*No space left on device.*earlier checkpoints are untouched"):
        save_checkpoint(tmp_path, 2, model, tok, opt, sched, {"tokens": 0}, keep=1)
    assert snapshot(tmp_path) == before and latest_checkpoint(tmp_path).name == "step_0000001"
