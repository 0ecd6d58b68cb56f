"""FSDP2 (`trainer.strategy=fsdp2`, dgtune/sharded.py) through the real CLI under `torchrun --nproc_per_node 2`
(gloo, CPU) on the 26B-shaped model (5 sliding : 1 full layers, 128 experts top-8, soft-capped tied head), with
the chunked loss and gradient checkpointing.

A 2-process FSDP2 run (2 x 2 rows) and a 1-process plain run (4 rows) see the same examples and noise: the same
loss and learning-rate traces and the same final adapter, which loads with plain `PeftModel.from_pretrained` with
every tensor at full shape; the end-of-run eval reads the gathered weights; only the main process writes; a run
rolled back to its step-2 checkpoint and resumed ends where the uninterrupted one did.
"""

import json
import shutil

import pytest
import torch

from test_distributed import TINY, _finish, _start

pytestmark = pytest.mark.slow  # several processes through torchrun

STEPS = 4
SHAPED = ["model=shaped26b", "model.sizes.vocab_size=4096", "model.sizes.canvas_length=24", "task.canvas_length=24",
          "objective.loss_chunk=8", "trainer.gradient_checkpointing=true", "lora.experts=true", "eval.at_end=true",
          "eval.steps=[2]", "eval.batch_size=4", "eval.compare_base=false", "trainer.lr=1e-3"]


FULL = ["lora=none", "objective.self_cond_p=0", "trainer.lr=1e-3"]  # a full fine-tune keeps the tied layers grouped


def _run(root, name, nproc, args, shaped=False):
    """Start a run of test_distributed's tiny scratch model (or, `shaped`, of the 26B-shaped model)."""
    base = TINY
    if shaped:  # the scratch model's keys give way to the shaped model's
        base = [a for a in base if not a.startswith(("model", "eval.at_end"))] + SHAPED
    if "lora=none" in args:
        base = [a for a in base if not a.startswith("lora.")]
    return _start([*args, f"run_dir={name}"], root, nproc, base)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny model: 'one' (1 process, plain, batch 8), 'two' (FSDP2, 2 processes x 4), 'resumed' ('two' rolled
    back to its step-2 checkpoint and resumed), 'full_one' / 'full_two' (the same for a full fine-tune). 26B-shaped model with expert LoRA, chunked loss, gradient
    checkpointing and the end-of-run eval: 'shaped_one' (1 process, plain, batch 4), 'shaped_two' (FSDP2, 2 x 2)."""
    root = tmp_path_factory.mktemp("fsdp2")
    fsdp = ["trainer.strategy=fsdp2"]
    out = {"one": _finish(_run(root, "one", 1, ["trainer.batch_size=8"]), 600),
           "two": _finish(_run(root, "two", 2, ["trainer.batch_size=4", *fsdp]), 600),
           "full_one": _finish(_run(root, "full_one", 1, ["trainer.batch_size=8", *FULL]), 600),
           "full_two": _finish(_run(root, "full_two", 2, ["trainer.batch_size=4", *FULL, *fsdp]), 600),
           "shaped_one": _finish(_run(root, "shaped_one", 1, ["trainer.batch_size=4"], True), 600),
           "shaped_two": _finish(_run(root, "shaped_two", 2, ["trainer.batch_size=2", *fsdp], True), 600)}
    for name, text in out.items():
        assert not text.startswith("FAILED"), f"{name}: {text}"
    shutil.copytree(root / "two", root / "resumed")  # as if killed after the step-2 checkpoint
    shutil.rmtree(root / "resumed" / "final")
    (root / "resumed" / "checkpoints" / "latest").write_text("step_0000002")
    (root / "resumed" / "metrics.jsonl").unlink()
    out["resumed"] = _finish(_run(root, "resumed", 2, ["trainer.batch_size=4", *fsdp, "resume=true"]), 600)
    return root, out


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_two_processes_equal_one(runs):
    root, out = runs
    assert "processes=2" in out["two"]
    a, b = _adapter(root / "one"), _adapter(root / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].shape == a[k].shape, k  # whole tensors, not a shard
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)  # Adam moves each weight by ~lr=1e-2 a step
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # training moved the adapter
    m1, m2 = _metrics(root / "one"), _metrics(root / "two")
    loss = [[m["train/loss"] for m in ms if "train/loss" in m] for ms in (m1, m2)]
    torch.testing.assert_close(torch.tensor(loss[1]), torch.tensor(loss[0]), rtol=1e-5, atol=1e-6)
    lr = [[(m["step"], m["train/lr"]) for m in ms if "train/lr" in m] for ms in (m1, m2)]
    assert lr[0] == lr[1] and [s for s, _ in lr[0]] == list(range(1, STEPS + 1))


def test_fsdp2_full_finetune_equals_one_process(runs):
    """A full fine-tune (every weight trains; the tied encoder/decoder layers shard as grouped units) under FSDP2
    saves the whole model, equal to the 1-process run's."""
    from safetensors.torch import load_file

    root, out = runs
    a = load_file(str(root / "full_one" / "final" / "model.safetensors"))
    b = load_file(str(root / "full_two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].shape == a[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    loss = [[m["train/loss"] for m in _metrics(root / r) if "train/loss" in m] for r in ("full_one", "full_two")]
    torch.testing.assert_close(torch.tensor(loss[1]), torch.tensor(loss[0]), rtol=1e-5, atol=1e-6)


def test_fsdp2_shaped_model_with_expert_lora_follows_one_process(runs):
    """The 26B-shaped model (expert LoRA, chunked loss, checkpointing): step 1 is the 1-process step to float
    rounding; later steps drift apart, as any two summation orders do on a 128-expert top-8 router under Adam (a
    gradient element at rounding level flips its update by 2 lr, and routing amplifies it; at lr 1e-2 the step-3
    loss differed by 0.4%): at lr 1e-3 the loss trace is compared at 1e-3."""
    root, _ = runs
    m1, m2 = _metrics(root / "shaped_one"), _metrics(root / "shaped_two")
    first = [next(m for m in ms if m.get("step") == 1 and "train/loss" in m) for ms in (m1, m2)]
    assert first[1]["train/loss"] == pytest.approx(first[0]["train/loss"], rel=1e-6)
    assert first[1]["train/grad_norm"] == pytest.approx(first[0]["train/grad_norm"], rel=1e-5)
    loss = [[m["train/loss"] for m in ms if "train/loss" in m] for ms in (m1, m2)]
    torch.testing.assert_close(torch.tensor(loss[1]), torch.tensor(loss[0]), rtol=1e-3, atol=0)
    a, b = _adapter(root / "shaped_one"), _adapter(root / "shaped_two")
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    assert all(b[k].shape == a[k].shape for k in a)
    moved = [k for k in b if "experts" in k and "lora_B" in k and float(b[k].abs().max()) > 0]
    assert moved  # the expert adapters trained (B starts at 0)


def test_fsdp2_adapter_loads_with_plain_peft_and_the_report_reads_it(runs):
    from omegaconf import OmegaConf
    from peft import PeftModel

    from dgtune.models.load import load_model

    root, _ = runs
    run = root / "shaped_two"
    base, _ = load_model(OmegaConf.load(run / "config.yaml").model)
    peft = PeftModel.from_pretrained(base, str(run / "final"))
    saved = _adapter(run)
    state = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) > 0
    for k, v in saved.items():
        torch.testing.assert_close(state[k.replace(".weight", ".default.weight")], v)
    # the end-of-run eval ran on the gathered weights (the main process' replica)
    report = json.loads((run / "report.json").read_text())
    assert [r["steps"] for r in report["rows"] if r["model"] == "tuned"] == [2]


def test_fsdp2_only_main_writes_and_checkpoints_hold_whole_tensors(runs):
    from safetensors.torch import load_file

    root, out = runs
    two = root / "two"
    assert out["two"].count("[dgtune] run_dir=") == 1 and out["two"].count("[dgtune] done:") == 1
    assert [m["step"] for m in _metrics(two) if "train/loss" in m] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    ckpt = two / "checkpoints" / "step_0000002"
    full = load_file(str(ckpt / "trainable.safetensors"))
    adapter = load_file(str(ckpt / "weights" / "adapter_model.safetensors"))
    assert len(full) == len(adapter) > 0
    assert sorted(v.shape for v in full.values()) == sorted(v.shape for v in adapter.values())
    osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(osd["state"]) == set(full)  # every trainable tensor's Adam state, by name, at full shape
    assert all(osd["state"][n]["exp_avg"].shape == full[n].shape for n in full)


def test_fsdp2_resumed_run_equals_uninterrupted(runs):
    root, out = runs
    assert not out["resumed"].startswith("FAILED"), out["resumed"]
    assert "resumed from" in out["resumed"] and "at step 2" in out["resumed"]
    a, b = _adapter(root / "two"), _adapter(root / "resumed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    loss = [[m["train/loss"] for m in _metrics(root / r) if "train/loss" in m] for r in ("two", "resumed")]
    torch.testing.assert_close(torch.tensor(loss[1]), torch.tensor(loss[0][2:]), rtol=1e-6, atol=1e-7)


GRAD_WORKER = r'''
import sys, torch, torch.distributed as dist
from omegaconf import OmegaConf
from dgtune.config import compose
from dgtune.diffusion.loss import DenoisingLoss
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.models.checkpointing import enable_gradient_checkpointing
from dgtune.models.family import family_of
from dgtune.models.shaped import build_shaped_model
from dgtune.train import apply_lora

def build():
    torch.manual_seed(0)
    model, tok = build_shaped_model(vocab_size=4096, canvas_length=24)
    model = apply_lora(model, compose(["model=shaped26b", "lora.experts=true", "lora.r=4"]).lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: every adapter (and the experts' A) gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    enable_gradient_checkpointing(model)
    model.train()
    cfg = ObjectiveConfig(**OmegaConf.to_container(compose(["objective=released"]).objective, resolve=True))
    cfg.loss_chunk = 8
    return DenoisingLoss(model, cfg, 4096, tok.mask_token_id), tok

def batch(tok):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(7, 60, (4, 30), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": torch.full((4,), 6),
            "canvas": ids[:, 6:30]}

if __name__ == "__main__":
    from dgtune.sharded import Sharded
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module, tok = build()
    module.processes = world  # each rank's loss: world x its rows' share of the batch loss (as SFT's method sets it)
    sharded = Sharded(module, family_of(module.model).shard_units, rank == 0, "cpu")
    rows = slice(rank * 2, rank * 2 + 2)
    module(batch(tok), torch.Generator().manual_seed(3), rows)["loss"].backward()
    grads = {n: p.grad.full_tensor() for n, p in module.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(grads, sys.argv[1])
    dist.destroy_process_group()
'''


def test_fsdp2_gradients_equal_one_process_on_the_shaped_model(tmp_path):
    """The check behind the run-level comparison: on the 26B-shaped model with LoRA on attention, MLP and the
    experts, the chunked loss and checkpointing, the gradient of a global batch split over 2 FSDP2 processes equals
    the 1-process gradient of the whole batch, every tensor to 1e-4 in relative norm (each process computes 2 x its
    rows' share of the batch loss; FSDP2 averages over processes). Adam then turns rounding-level differences of near-zero elements
    into lr-sized ones, which is why the trained adapters are compared on the tiny model only."""
    import os
    import subprocess
    import sys
    import importlib.util

    script = tmp_path / "grad_worker.py"
    script.write_text(GRAD_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(tmp_path.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "grads.pt")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "grads.pt", weights_only=True)

    spec = importlib.util.spec_from_file_location("grad_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    module, tok = worker.build()
    module(worker.batch(tok), torch.Generator().manual_seed(3))["loss"].backward()
    one = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert one.keys() == two.keys() and any("experts" in n for n in one)
    for n in one:
        assert two[n].shape == one[n].shape, n
        err = float((two[n] - one[n]).norm() / one[n].norm())
        assert err < 1e-4, (n, err)  # measured: 1e-5 (float32 summation order), every tensor
