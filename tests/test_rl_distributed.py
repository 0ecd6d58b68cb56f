"""`method=rl` under `torchrun --nproc_per_node 2` (gloo, CPU, a tiny scratch model): each process draws and
grades its own groups' rollouts from per-row seeds, so a 2-process run (8 completions per process) ends with the
adapter of a 1-process run with all 16, from the same `init_from` SFT run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from test_distributed import TINY, _finish

pytestmark = pytest.mark.slow  # several processes through torchrun

REWARD = "def share_of_one(row, output):\n    return output.count('1') / max(len(output), 1)\n"


def _start(args, cwd, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(cwd)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "dgtune.train", *TINY, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_process_rl_equals_one_process(tmp_path):
    (tmp_path / "rl_reward_mod.py").write_text(REWARD)
    out = _finish(_start(["trainer.batch_size=8", "run_dir=sft"], tmp_path, 1))
    assert not out.startswith("FAILED"), out
    rl = ["method=rl", "init_from=sft", "method.group_size=4", "method.rollout_steps=2", "trainer.max_steps=3",
          "trainer.ckpt_every=100", "method.reward_fn=rl_reward_mod:share_of_one", "method.beta=0.05"]
    one = _start([*rl, "trainer.batch_size=16", "run_dir=one"], tmp_path, 1)
    two = _start([*rl, "trainer.batch_size=8", "run_dir=two"], tmp_path, 2)
    out_one, out_two = _finish(one), _finish(two)
    assert not out_one.startswith("FAILED"), out_one
    assert not out_two.startswith("FAILED"), out_two
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    assert [round(m["train/reward"], 5) for m in m1] == [round(m["train/reward"], 5) for m in m2]  # same rollouts
    assert a.keys() == b.keys()
    for k in a:  # the estimates of 8 rows and of 16 differ in the last bits (matmul shapes); Adam (lr 1e-2) scales
        # a near-zero gradient element up, so one adapter value of 128 differed by 7e-6 (relative 5e-4)
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_two_process_rft_equals_one_process(tmp_path):
    """`method.objective=rft` (the recipe's objective): the approved completions of both processes are gathered and
    the denoising loss draws its noise for all of them, each process training its own slice, so the 2-process run
    (4 rows each) ends with the adapter of the 1-process run (8 rows) and logs the same rewards."""
    (tmp_path / "rl_reward_mod.py").write_text(REWARD)
    out = _finish(_start(["trainer.batch_size=8", "run_dir=sft"], tmp_path, 1))
    assert not out.startswith("FAILED"), out
    rl = ["method=rl", "init_from=sft", "method.objective=rft", "method.group_size=1", "method.rft_min_reward=0.1",
          "method.rollout_steps=2", "trainer.max_steps=3", "trainer.ckpt_every=100",
          "method.reward_fn=rl_reward_mod:share_of_one"]
    one = _start([*rl, "trainer.batch_size=8", "run_dir=one"], tmp_path, 1)
    two = _start([*rl, "trainer.batch_size=4", "run_dir=two"], tmp_path, 2)
    out_one, out_two = _finish(one), _finish(two)
    assert not out_one.startswith("FAILED"), out_one
    assert not out_two.startswith("FAILED"), out_two
    from safetensors.torch import load_file

    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    assert [round(m["train/reward"], 5) for m in m1] == [round(m["train/reward"], 5) for m in m2]  # same rollouts
    assert all(0 < m["train/approved"] < 1 for m in m1), m1  # some rows approved, some not: the slices matter
    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
