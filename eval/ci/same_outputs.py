"""Check (not a test): do two source trees generate the same task rows and draw the same sampler outputs?

    python eval/ci/same_outputs.py BEFORE_TREE AFTER_TREE

For each tree, in its own process (that tree first on `sys.path`): md5 of the rows of five generated tasks (train
50, test 30, val 7) and of the tokens and forward-pass counts of every sampler config (`configs/sampler/*`, 8
steps) under the released and the mean_loo prediction, plain, with the Sudoku canvas template and with the template
and the rule guide, on 12 4x4 test prompts and the bundled tiny base. Prints both trees' digests and `same=True` when
every line matches. Used for the refactors of issue 23, whose behaviour must not change.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import hashlib, json, sys
sys.path.insert(0, TREE)
import torch
torch.set_num_threads(1)
from dgtune.config import compose
from dgtune.data import prompt_ids
from dgtune.models.load import load_model
from dgtune.sampling.config import sampler_config
from dgtune.sampling.sampler import sample
from dgtune.tasks.registry import build_task
for name in ["sudoku4", "sudoku9", "json_record", "countdown", "coloring"]:
    task = build_task(compose([f"task={name}"]).task)
    rows = task.build_split("train", 50, 0) + task.build_split("test", 30, 1) + task.build_split("val", 7, 0)
    print("rows", name, hashlib.md5(json.dumps(rows, sort_keys=True).encode()).hexdigest(), flush=True)
cfg = compose(["task=sudoku4", "task.template=true"])
model, tok = load_model(cfg.model)
task = build_task(cfg.task)
rows = task.build_split("test", 12, 0)
prompts = torch.tensor([prompt_ids(tok, r["prompt"]) for r in rows])
for name in ["entropy_bound", "threshold", "topk_confidence", "topk_confidence_mask", "topk_entropy", "topk_margin",
             "topk_margin_mask", "topk_random"]:
    h = hashlib.md5()
    for obj in ["released", "mean_loo"]:
        c = compose([f"sampler={name}", f"objective={obj}", "task=sudoku4", "task.template=true", "sampler.max_steps=8"])
        sc = sampler_config(c, tok)
        for tmpl, guide in [(False, False), (True, False), (True, True)]:
            t = task.template_tensor(tok, rows) if tmpl else None
            g = task.make_guide(tok, rows) if guide else None
            out = sample(model, prompts, sc, torch.Generator().manual_seed(3), tok.eos_token_id, tok.pad_token_id,
                         task.canvas_length, template=t, guide=g)
            h.update(out.tokens.numpy().tobytes()); h.update(out.nfe.numpy().tobytes())
    print("sampler", name, h.hexdigest(), flush=True)
'''


def digests(tree: str) -> list[str]:
    """The digest lines of `tree` (run from /, so that only `tree` provides dgtune first on the path)."""
    out = subprocess.run([sys.executable, "-c", CHILD.replace("TREE", repr(tree))], cwd="/", capture_output=True,
                         text=True, check=True)
    return out.stdout.splitlines()


def main() -> None:
    before, after = sys.argv[1], sys.argv[2]
    a, b = digests(before), digests(after)
    for x, y in zip(a, b):
        print(f"{x}  {'==' if x == y else '!='}  {y.split()[-1]}")
    print(f"same={a == b and len(a) > 0}")


if __name__ == "__main__":
    main()
