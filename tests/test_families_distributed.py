"""Several processes on the families built in code (through the real CLI under `torchrun --nproc_per_node 2`, gloo,
CPU): the tiny SDAR (block diffusion, whose loss normalises over the batch's answer tokens) and the tiny LLaDA (a
one-stack family) on `recipe=sudoku_4x4`, whose canvas templates give every row its own count of free positions.
A 1-process run with the global batch, a 2-process DDP run and a 2-process FSDP2 run see the same examples and
noise, so they end with the same adapter (see tests/test_distributed.py and tests/test_fsdp2.py for DiffusionGemma)."""

import pytest
import torch

from test_distributed import _finish, _start

pytestmark = pytest.mark.slow  # several processes through torchrun

FAMILIES = {
    "sdar": ["model=sdar_tiny", "objective=sdar", "sampler=block_refine", "model.sizes.hidden_size=32",
             "model.sizes.intermediate_size=64", "model.sizes.num_hidden_layers=2"],
    "llada": ["model=llada_tiny", "objective=llada", "sampler=topk_confidence_mask", "model.sizes.d_model=32",
              "model.sizes.n_layers=2", "model.sizes.mlp_hidden_size=64"],
}
BASE = ["recipe=sudoku_4x4", "task.n_train=64", "task.n_val=4", "task.n_test=4", "lora.r=4", "trainer.max_steps=3",
        "trainer.warmup_steps=1", "trainer.ckpt_every=3", "trainer.keep_checkpoints=0", "trainer.log_every=1",
        "trainer.lr=1e-2", "trainer.progress_bar=false", "trainer.device=cpu", "trainer.mixed_precision=no",
        "eval.at_end=false", "eval.quick_every=0", "logger=none"]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_ddp_and_fsdp2_train_the_adapter_of_one(tmp_path, family):
    """The final adapters of 1 process x 8 rows, 2 DDP processes x 4 and 2 FSDP2 processes x 4 agree."""
    from safetensors.torch import load_file

    base = [*BASE, *FAMILIES[family]]
    one = _start(["trainer.batch_size=8", "run_dir=one"], tmp_path, 1, base)
    ddp = _start(["trainer.batch_size=4", "run_dir=ddp"], tmp_path, 2, base)
    out = {"one": _finish(one), "ddp": _finish(ddp)}
    out["fsdp2"] = _finish(_start(["trainer.batch_size=4", "trainer.strategy=fsdp2", "run_dir=fsdp2"], tmp_path, 2, base))
    for name, text in out.items():
        assert not text.startswith("FAILED"), f"{name}: {text}"
    ref = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in ref.items() if "lora_B" in k)
    for name in ("ddp", "fsdp2"):
        got = load_file(str(tmp_path / name / "final" / "adapter_model.safetensors"))
        assert got.keys() == ref.keys(), name
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
