"""Multi-process training through the real CLI under `torchrun --nproc_per_node 2` (gloo, CPU, a tiny scratch model).

One 1-process run with the global batch (2 x 4) and one 2-process run (4 per process) see the same examples and
noise, so they must end with the same adapter and learning-rate trace; only the main process writes the run folder;
a 2-process run resumed from its step-2 checkpoint ends where the uninterrupted one did.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # several processes through torchrun: pytest -m 'not slow' skips them

STEPS = 4
TINY = ["model=scratch", "model.sizes.hidden_size=32", "model.sizes.num_hidden_layers=2",
        "model.sizes.num_attention_heads=2", "model.sizes.num_key_value_heads=1", "model.sizes.head_dim=16",
        "model.sizes.intermediate_size=32", "model.sizes.num_experts=2", "model.sizes.top_k_experts=1",
        "model.sizes.moe_intermediate_size=16", "task=sudoku4", "task.n_train=64", "task.n_val=4", "task.n_test=4",
        "lora.r=4", f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2", "trainer.ckpt_every=2",
        "trainer.keep_checkpoints=0", "trainer.log_every=1", "trainer.lr=1e-2", "trainer.progress_bar=false",
        "trainer.device=cpu", "trainer.mixed_precision=no", "eval.at_end=false", "eval.quick_every=0", "logger=none"]


def _start(args, cwd, nproc, base=None):
    """Start `dgtune.train` on `nproc` processes with the `base` overrides (TINY by default), then `args`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "dgtune.train", *(TINY if base is None else base),
           *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return out if proc.returncode == 0 else f"FAILED (exit {proc.returncode}):\n{out[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders and stdout of: 'one' (1 process, batch 8), 'two' (2 processes x batch 4), 'resumed' ('two'
    rolled back to its step-2 checkpoint and resumed with `resume=true`)."""
    root = tmp_path_factory.mktemp("ddp")
    one = _start(["trainer.batch_size=8", "run_dir=one"], root, 1)
    two = _start(["trainer.batch_size=4", "run_dir=two"], root, 2)
    out = {"one": _finish(one), "two": _finish(two)}
    assert not out["one"].startswith("FAILED"), out["one"]
    assert not out["two"].startswith("FAILED"), out["two"]

    shutil.copytree(root / "two", root / "resumed")  # as if killed after the step-2 checkpoint
    shutil.rmtree(root / "resumed" / "final")
    (root / "resumed" / "checkpoints" / "latest").write_text("step_0000002")
    (root / "resumed" / "metrics.jsonl").unlink()
    out["resumed"] = _finish(_start(["trainer.batch_size=4", "run_dir=resumed", "resume=true"], root, 2))
    return root, out


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_run_records_its_number_of_processes(runs):
    root, out = runs
    assert "processes=2" in out["two"] and "processes=1" in out["one"]
    state = json.loads((root / "two" / "checkpoints" / f"step_{STEPS:07d}" / "state.json").read_text())
    assert state["num_processes"] == 2


def test_two_processes_train_the_adapter_of_one_with_the_global_batch(runs):
    root, _ = runs
    a, b = _adapter(root / "one"), _adapter(root / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)  # Adam moves each weight by ~lr=1e-2 a step
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # training moved the adapter
    loss = {name: [m["train/loss"] for m in _metrics(root / name) if "train/loss" in m] for name in ("one", "two")}
    torch.testing.assert_close(torch.tensor(loss["two"]), torch.tensor(loss["one"]), rtol=1e-5, atol=1e-6)


def test_learning_rate_advances_once_per_step_whatever_the_processes(runs):
    root, _ = runs
    lr = {name: [(m["step"], m["train/lr"]) for m in _metrics(root / name) if "train/lr" in m] for name in ("one", "two")}
    assert [s for s, _ in lr["one"]] == list(range(1, STEPS + 1))
    assert lr["two"] == lr["one"]


def test_only_the_main_process_writes_the_run_folder(runs):
    root, out = runs
    two = root / "two"
    assert [m["step"] for m in _metrics(two) if "train/loss" in m] == list(range(1, STEPS + 1))  # each step once
    assert out["two"].count("[dgtune] run_dir=") == 1 and out["two"].count("[dgtune] done:") == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert (two / "final" / "adapter_model.safetensors").exists() and (two / "config.yaml").exists()


def test_resumed_two_process_run_equals_uninterrupted(runs):
    root, out = runs
    assert not out["resumed"].startswith("FAILED"), out["resumed"]
    assert "resumed from" in out["resumed"] and "at step 2" in out["resumed"]
    assert [m["step"] for m in _metrics(root / "resumed") if "train/loss" in m] == list(range(3, STEPS + 1))
    a, b = _adapter(root / "two"), _adapter(root / "resumed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_torchrun_without_a_process_group_fails_clearly(tmp_path):
    # without trainer.device=cpu on a machine without GPUs accelerate sets up no process group: each process
    # would train alone and write the same run folder
    args = [a for a in TINY if a != "trainer.device=cpu"] + ["trainer.device=auto", "run_dir=r"]
    if torch.cuda.device_count() >= 2:
        pytest.skip("GPUs present: accelerate sets up NCCL")
    out = _finish(_start(args, tmp_path, 2))
    assert out.startswith("FAILED") and "WORLD_SIZE=2" in out and "trainer.device=cpu" in out
