"""Issue 22: `train()` owns its accelerate state (calls with different precision follow each other in one process),
`trainer.mixed_precision=auto` resolves the same way in tests on every CPU when `DGTUNE_AUTO_PRECISION` says so,
and every run and report records the precision and machine that produced it."""

import json
from pathlib import Path

import pytest
import torch

import dgtune.diffusion.loss as loss_mod
from dgtune.config import compose
from dgtune.runtime import AUTO_ENV, cpu_bf16_supported, environment, resolve_precision
from dgtune.validate import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = ROOT / "dgtune" / "assets" / "tiny-diffusiongemma"

SMALL = ["task=sudoku4", "trainer.max_steps=2", "trainer.batch_size=4", "task.n_train=16", "task.n_val=4",
         "task.n_test=4", "eval.steps=[1]", "eval.quick_every=0", "eval.batch_size=8", "eval.compare_base=false",
         "trainer.progress_bar=false", "trainer.warmup_steps=1", "logger=none"]


def test_auto_resolves_by_the_machine_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    native = "bf16" if cpu_bf16_supported() else "no"
    assert resolve_precision("auto", "cpu") == native  # trainer.device=cpu never picks the GPU's precision
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == native
    for forced in ("no", "bf16"):
        monkeypatch.setenv(AUTO_ENV, forced)
        assert resolve_precision("auto", "cpu") == forced
        assert resolve_precision("fp16", "cpu") == "fp16"  # an explicit setting always wins
    monkeypatch.setenv(AUTO_ENV, "fp8")
    with pytest.raises(ConfigError, match=AUTO_ENV):
        resolve_precision("auto", "cpu")


def test_environment_names_precision_threads_cpu_and_versions():
    env = environment("bf16")
    assert env["precision"] == "bf16" and env["torch_threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__ and isinstance(env["cpu_bf16"], bool) and env["cpu"]
    assert {"transformers", "accelerate", "python"} <= env.keys()
    assert "precision" not in environment()


@pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").exists(), reason="bundled base not built")
def test_train_twice_in_one_process_with_other_precisions(tmp_path, monkeypatch):
    """no, then bf16, then auto (forced to each outcome): every call trains, under the autocast it names, and its
    run folder and report say which precision it used. Before each call owned its accelerate state, the second
    call failed with accelerate's 'AcceleratorState has already been initialized'."""
    from dgtune.train import train

    seen = []
    real = loss_mod.decode_hidden

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return out

    monkeypatch.setattr(loss_mod, "decode_hidden", recording)
    cases = [("no", None, "no"), ("bf16", None, "bf16"), ("auto", "no", "no"), ("auto", "bf16", "bf16")]
    for i, (requested, forced, expect) in enumerate(cases):
        if forced is None:
            monkeypatch.delenv(AUTO_ENV, raising=False)
        else:
            monkeypatch.setenv(AUTO_ENV, forced)
        seen.clear()
        run = tmp_path / f"run{i}"
        summary = train(compose([*SMALL, f"run_dir={run}", f"data_dir={tmp_path / 'data'}",
                                 f"trainer.mixed_precision={requested}", "trainer.device=cpu"]))
        assert summary["precision"] == expect and summary["steps"] == 2, (requested, forced)
        assert seen, "the loss was never computed"
        if expect == "bf16":
            assert all(on and dtype == torch.bfloat16 for on, dtype in seen), (requested, forced, seen)
        else:
            assert not any(on for on, _ in seen), (requested, forced, seen)
        env = json.loads((run / "environment.json").read_text())
        assert env["precision"] == expect and env["torch_threads"] == torch.get_num_threads()
        meta = json.loads(Path(summary["report"]).read_text())["meta"]
        assert meta["train_precision"] == expect and meta["train_environment"]["cpu_bf16"] == cpu_bf16_supported()
        assert meta["eval_environment"]["precision"] == "float32 weights, no autocast"
        assert f"train_precision**: {expect}" in (run / "report.md").read_text()
