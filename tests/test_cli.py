"""The real CLIs on the bundled tiny model: train (recipe=sudoku), resume after a kill, eval, export; bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.trains  # trains with trainer.mixed_precision=auto: .ci/run reruns it under auto's other outcome

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "dgtune" / "assets" / "tiny-diffusiongemma" / "model.safetensors"
needs_base = pytest.mark.skipif(not BUNDLED.exists(), reason="bundled base not built")

SMALL = ["trainer.batch_size=8", "task.n_train=64", "task.n_val=8", "task.n_test=12", "eval.quick_n=4",
         "trainer.progress_bar=false", "trainer.log_every=1"]


def run_cli(module, args, tmp_path, check=True, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "", "WANDB_API_KEY": ""}
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@needs_base
@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_train_sudoku_end_to_end_with_wandb_offline(tmp_path):
    proc = run_cli("dgtune.train", ["recipe=sudoku", "trainer.max_steps=3", "eval.steps=[1,2]", "eval.quick_every=2",
                                    "run_dir=run", "logger=wandb", *SMALL], tmp_path)
    run = tmp_path / "run"
    assert "logging offline" in proc.stdout
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run folder missing"
    assert (run / "final" / "adapter_config.json").exists() and (run / "final" / "adapter_model.safetensors").exists()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in m for m in metrics) and any("val/solved@12" in m for m in metrics)
    report = json.loads((run / "report.json").read_text())
    keys = {"model", "bucket", "steps", "solved", "exact", "cell_acc", "parse_fail", "mean_nfe", "tokens_per_s",
            "sampler", "steps_to_plateau", "solved_lo", "solved_hi"}
    assert report["rows"] and all(keys <= set(r) for r in report["rows"])
    assert {r["model"] for r in report["rows"]} == {"base", "tuned"}
    assert {r["bucket"] for r in report["rows"]} == {"all", "easy", "medium", "hard"}
    assert {r["steps"] for r in report["rows"]} == {1, 2}
    assert (run / "report.md").exists() and (run / "accuracy_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tuned" in proc.stdout  # the table is printed

    # dgtune.eval on the finished run with the public 4x4-style CSV path replaced by a malformed file
    bad = tmp_path / "bad.csv"
    bad.write_text("puzzle,solution\n" + "0" * 81 + ",\n" + "12x" + "0" * 78 + ",\n")
    proc = run_cli("dgtune.eval", [str(run), f"task.test_file={bad}", "eval.steps=[1]"], tmp_path, check=False)
    assert proc.returncode != 0 and str(bad) in proc.stderr and "line 3" in proc.stderr

    # unknown key in eval overrides
    proc = run_cli("dgtune.eval", [str(run), "eval.stepz=[1]"], tmp_path, check=False)
    assert proc.returncode != 0 and "eval.stepz" in proc.stderr

    # export: adapter copy and merged model
    run_cli("dgtune.export", [str(run), str(tmp_path / "adapter")], tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    # publish: a run-shaped folder that dgtune.eval loads; never over published weights
    pub = tmp_path / "published"
    run_cli("dgtune.export", [str(run), str(pub), "--publish"], tmp_path)
    assert (pub / "report.md").exists() and not (pub / "final" / "README.md").exists()
    assert "run_dir: null" in (pub / "config.yaml").read_text()
    run_cli("dgtune.eval", [str(pub), "eval.steps=[1]", "eval.compare_base=false", f"eval.out_dir={tmp_path / 'r'}"],
            tmp_path)
    assert (tmp_path / "r" / "report.json").exists()
    proc = run_cli("dgtune.export", [str(run), str(pub), "--publish"], tmp_path, check=False)
    assert proc.returncode != 0 and str(pub / "final") in proc.stderr


@needs_base
@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    args = ["recipe=sudoku", "trainer.max_steps=12", "trainer.ckpt_every=2", "eval.at_end=false", "eval.quick_every=0",
            "trainer.lr=1e-2", *SMALL]
    run_cli("dgtune.train", [*args, "run_dir=full"], tmp_path)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dgtune.train", *args, "run_name=killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "runs").glob("killed-*/checkpoints/latest")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_runs = list((tmp_path / "runs").glob("killed-*"))
    assert len(killed_runs) == 1 and not (killed_runs[0] / "final").exists(), "run finished before it was killed"

    out = run_cli("dgtune.train", [*args, "run_name=killed", "resume=true"], tmp_path)
    assert "resumed from" in out.stdout
    resumed_at = int(out.stdout.split("at step ")[1].split()[0])
    assert 2 <= resumed_at < 12

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(killed_runs[0] / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # training moved the adapter


@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_resume_without_checkpoint_and_unknown_key_fail_clearly(tmp_path):
    proc = run_cli("dgtune.train", ["recipe=sudoku", "resume=true", "run_dir=nothing_here"], tmp_path, check=False)
    assert proc.returncode != 0 and "no complete checkpoint" in proc.stderr and "nothing_here" in proc.stderr
    proc = run_cli("dgtune.train", ["recipe=sudoku", "trainer.bogus_key=1"], tmp_path, check=False)
    assert proc.returncode != 0 and "bogus_key" in proc.stderr
    proc = run_cli("dgtune.eval", [str(tmp_path / "missing_run")], tmp_path, check=False)
    assert proc.returncode != 0 and "missing_run" in proc.stderr


def test_hub_model_fails_fast_offline(monkeypatch):
    from dgtune.config import compose
    from dgtune.models.load import ModelNotAvailableError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["recipe=sudoku_26b"])
    t0 = time.time()
    with pytest.raises(ModelNotAvailableError, match="google/diffusiongemma-26B-A4B-it.*unreachable"):
        load_model(cfg.model)
    assert time.time() - t0 < 5


def test_every_recipe_composes():
    from dgtune.config import compose, recipes_dir

    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    assert {"sudoku", "sudoku_4x4", "tiny_base"} <= set(names)
    for name in names:
        cfg = compose([f"recipe={name}"])
        assert cfg.run_name == name
        assert cfg.task.name and cfg.trainer.max_steps > 0 and cfg.sampler.max_steps > 0


def test_merged_export_equals_base_plus_adapter(tiny):
    import copy

    from peft import get_peft_model, LoraConfig

    from dgtune.export import merge_adapter

    model, tok = tiny
    lcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=(
        r"model\.(encoder\.language_model|decoder)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"))
    peft_model = get_peft_model(copy.deepcopy(model), lcfg)
    ids = torch.randint(7, 40, (2, 9))
    canvas = torch.randint(0, 40, (2, model.config.canvas_length))
    with torch.no_grad():
        ref = peft_model(input_ids=ids, decoder_input_ids=canvas).logits
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        merged = merge_adapter(copy.deepcopy(model), d)
    with torch.no_grad():
        out = merged(input_ids=ids, decoder_input_ids=canvas).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@needs_base
@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_sweep_runs_share_a_wandb_group(tmp_path):
    proc = run_cli("dgtune.train", ["-m", "recipe=sudoku", "lora.r=4,8", "trainer.max_steps=1", "eval.at_end=false",
                                    "eval.quick_every=0", "logger=wandb", *SMALL], tmp_path)
    runs = sorted((tmp_path / "runs").glob("sudoku-*-j*"))
    assert len(runs) == 2, proc.stdout[-2000:]
    infos = [json.loads((run / "wandb_run.json").read_text()) for run in runs]
    assert all(list((run / "wandb").glob("offline-run-*")) for run in runs)
    assert infos[0]["group"] and infos[0]["group"] == infos[1]["group"] and infos[0]["id"] != infos[1]["id"]
    assert {i["mode"] for i in infos} == {"offline"}


@needs_base
@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_coloring_recipe_reports_guided_curves_for_base_and_tuned(tmp_path):
    """`recipe=coloring` turns `eval.guided` on: the report carries the +verifier curve of the tuned model and of the
    base through the same per-row guide (before: only the tuned model's, so nothing showed what the rules alone give)."""
    run_cli("dgtune.train", ["recipe=coloring", "trainer.max_steps=2", "eval.steps=[2]", "eval.quick_every=0",
                             "run_dir=run", *SMALL], tmp_path)
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert {(r["model"], r["sampler"]) for r in rows} == {(m, s) for m in ("base", "tuned")
                                                         for s in ("topk_margin", "topk_margin+verifier")}
    assert {r["bucket"] for r in rows} == {"all", "v6", "v8", "v10"}
