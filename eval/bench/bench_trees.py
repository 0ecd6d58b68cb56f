"""Benchmark (not a test): is one source tree slower than another at the training step and the sampler step?

    python eval/bench/bench_trees.py BEFORE_TREE AFTER_TREE [--rounds 3] [--train-steps 60] [--threads 2]

Each round runs, in a fresh process per tree and alternating the trees (before, after, after, before, ...), the
same two measurements through APIs both trees have: (1) `train()` of `recipe=sudoku` for `--train-steps` steps
(no eval, no checkpoint until the end; the loop's own wall time, `summary["train_minutes"]`) and (2) the fast
sampler (`dgtune.sampling.sampler.sample`, the eval default) on 64 test prompts of 9x9 Sudoku (medium) at 12 and 48
steps (`topk_confidence`: every call runs all its steps), median of 5 calls after a warm-up. Prints each figure and, last, `train_ratio=X.XXX sampler_ratio=Y.YYY`
(after / before, medians over rounds; <= 1.05 means the after tree is no more than 5% slower). Run it alone on
the machine: another job on the CPU makes the figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, os, statistics, sys, tempfile, time
import torch
from dgtune.config import compose
from dgtune.train import train
out = {}
with tempfile.TemporaryDirectory() as tmp:
    cfg = compose(["recipe=sudoku", f"trainer.max_steps={STEPS}", "eval.at_end=false", "eval.quick_every=0",
                   "trainer.ckpt_every=100000", "trainer.progress_bar=false", "trainer.mixed_precision=no",
                   "logger=none", f"run_dir={tmp}/run", f"data_dir={DATA}"])
    out["train_s"] = 60 * train(cfg)["train_minutes"]
from dgtune.data import splits_for
from dgtune.models.load import load_model
from dgtune.sampling.sampler import SamplerConfig, sample
from dgtune.tasks import build_task
from dgtune.data import prompt_ids, row_prompt
cfg = compose(["recipe=sudoku", f"data_dir={DATA}"])
task = build_task(cfg.task)
model, tok = load_model(cfg.model)
model.config.canvas_length = task.canvas_length
model.eval()
rows = [r for r in splits_for(task, cfg)["test"] if r.get("bucket") == "medium"][:64]
prompts = torch.tensor([prompt_ids(tok, row_prompt(r)) for r in rows])
tmpl = task.template_tensor(tok, rows) if getattr(task, "use_template", False) else None
for steps in (12, 48):
    # the fast sampler as eval runs it (fp32 fused decoder, template clamped), with a fixed-schedule strategy so
    # that every call runs all its steps (entropy_bound stops confident rows early: too short to time)
    scfg = SamplerConfig(mode="fast", strategy="topk_confidence", max_steps=steps)
    times = []
    for rep in range(6):
        t0 = time.perf_counter()
        sample(model, prompts, scfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id,
               task.canvas_length, row_seeds=torch.arange(len(rows)), template=tmpl)
        if rep:
            times.append(time.perf_counter() - t0)
    out[f"sample{steps}_s"] = statistics.median(times)
print("RESULT " + json.dumps(out))
'''


def measure(tree: Path, steps: int, threads: int, data: str) -> dict:
    """One child process in `tree` (its `dgtune` package first on the path): the figures of CHILD."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(tree)}
    code = CHILD.replace("STEPS", str(steps)).replace("DATA", repr(data))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{tree}: child failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    """Alternate the trees, print every figure and the after / before ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    figures = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as data:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                res = measure(getattr(args, name).resolve(), args.train_steps, args.threads, data)
                figures[name].append(res)
                print(f"round {r} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    med = {n: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for n, fs in figures.items()}
    train_ratio = med["after"]["train_s"] / med["before"]["train_s"]
    sampler_ratio = statistics.geometric_mean(
        [med["after"][k] / med["before"][k] for k in med["after"] if k.startswith("sample")])
    print(f"train_ratio={train_ratio:.3f} sampler_ratio={sampler_ratio:.3f}")


if __name__ == "__main__":
    main()
