"""Measure (not a test): how noisy is each RL likelihood estimator, and does it tell right completions from wrong?

    python eval/analysis/rl_estimators.py RUN_DIR [--prompts 32] [--group 8] [--steps 2] [--repeats 8]

Draws `--group` completions for each of `--prompts` test prompts of the run's task with the run's weights at
`--steps` denoising steps (the rollouts of `method=rl`), then for each estimator setting computes every completion's
sequence estimate `--repeats` times with independent draws and prints: the variance across draws (mean over
completions), the same relative to the variance across completions, the mean estimate of solved and of unsolved
completions, and the AUC of the estimate for telling them apart (0.5 = no signal), and the seconds per estimate of
the whole batch.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties half."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from dgtune.data import splits_for
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.eval.runs import compose_run, load_run
    from dgtune.rl.method import RL
    from dgtune.rl.likelihood import ESTIMATORS, sequence_logp
    from dgtune.tasks import build_task

    cfg = compose_run(OmegaConf.load(args.run_dir / "config.yaml"),
                      ["method=rl", f"method.group_size={args.group}", f"method.rollout_steps={args.steps}",
                       f"trainer.batch_size={args.prompts * args.group}", "method.variance_every=0", "trainer.grad_accum=1",
                       "method.log_kl=false", "method.skip_flat_groups=false"])  # every completion, flat groups too
    task = build_task(cfg.task)
    model, tok, _ = load_run(args.run_dir, cfg)
    model.config.canvas_length = task.canvas_length
    splits = splits_for(task, cfg)
    splits = {**splits, "train": splits["test"]}  # the prompts: test rows
    method = RL(cfg, task, splits, model, tok, 1)
    ro = method._rollouts(0, torch.device("cpu"), None)
    solved = ro.solved.bool()
    print(f"{len(solved)} completions of {args.prompts} prompts at {args.steps} steps: solved {float(solved.float().mean()):.3f}")
    obj = ObjectiveConfig(**OmegaConf.to_container(cfg.objective, resolve=True))
    v, mask_id = method.vocab, method.mask_id
    print("| estimator | draws | var across draws | / var across completions | mean solved | mean unsolved | AUC | s per batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, draws in (("one_pass", 1), ("one_pass", 4), ("elbo", 1), ("elbo", 4)):
        reps, t0 = [], time.perf_counter()
        with torch.no_grad():
            for j in range(args.repeats):
                b = replace(ro.batch, seeds=ro.batch.seeds + 1_000_003 * j)
                reps.append(sequence_logp(ESTIMATORS[name](model, b, obj, v, mask_id, draws, float(cfg.method.prompt_noise)
                                                           if name == "one_pass" else 0.0), b.free))
        sec = (time.perf_counter() - t0) / args.repeats
        r = torch.stack(reps)  # [repeats, n]
        within, between = float(r.var(0).mean()), float(r.mean(0).var())
        m = r.mean(0)
        print(f"| {name} | {draws} | {within:.4f} | {within / max(between, 1e-12):.3f} | {float(m[solved].mean()):.3f} | "
              f"{float(m[~solved].mean()):.3f} | {auc(r[0], solved):.3f} | {sec:.2f} |")


if __name__ == "__main__":
    main()
