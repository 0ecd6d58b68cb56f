"""Measure (not a test): does an RL update on a block of rollouts raise the reward of fresh rollouts of the same
prompts? A first-order check of an estimator's policy gradient, without Adam's per-parameter scaling.

    python eval/analysis/rl_direction.py RUN_DIR --estimator one_pass --lr 0.01 [--steps 5] [--prompts 32]
        [--group 8] [--rollout-steps 2] [--repeats 3] [override ...]

Draws `--prompts` x `--group` rollouts of training prompts with the run's weights (block 0 of `method=rl`), takes
`--steps` plain SGD steps of `--lr` on the RL loss of those rollouts (a negative lr ascends instead: the control
for the sign), then draws the same prompts again `--repeats` times with fresh sampler seeds and prints the mean
reward and solved rate before and after. A good estimator's descent raises the reward at small lr and its ascent
lowers it. Extra `override`s go to the config (e.g. `method.reward.cell_acc=0.5`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--estimator", default="one_pass")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--rollout-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args, extra = ap.parse_known_args(argv)
    args.overrides = list(args.overrides) + extra

    from omegaconf import OmegaConf

    from dgtune.data import splits_for
    from dgtune.eval.runs import compose_run, load_run
    from dgtune.rl.method import RL
    from dgtune.tasks import build_task

    torch.manual_seed(0)
    cfg = compose_run(OmegaConf.load(args.run_dir / "config.yaml"), [
        "method=rl", f"method.group_size={args.group}", f"method.rollout_steps={args.rollout_steps}",
        f"trainer.batch_size={args.prompts * args.group}", "method.variance_every=0", f"method.estimator={args.estimator}",
        "method.log_kl=false", *args.overrides])
    task = build_task(cfg.task)
    model, tok, _ = load_run(args.run_dir, cfg)
    model.config.canvas_length = task.canvas_length
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    method = RL(cfg, task, splits_for(task, cfg), model, tok, 1)
    cpu = torch.device("cpu")
    block = method._rollouts(0, cpu, None)

    def fresh(k: int) -> tuple[float, float]:
        """Rollouts of the same prompts with the rows' sampler seeds shifted by k."""
        rollout_sampler, method.sampler = method.sampler, replace(method.sampler, last_step="argmax")  # as deployed
        try:
            ro = method._rollouts(0, cpu, None, seed_offset=10_000 * k)
        finally:
            method.sampler = rollout_sampler
        return float(ro.rewards.mean()), float(ro.solved.mean())

    model.eval()
    before = [fresh(k + 1) for k in range(args.repeats)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=abs(args.lr), maximize=args.lr < 0)
    model.train()
    for _ in range(args.steps):
        opt.zero_grad()
        method.module(block)["loss"].backward()
        opt.step()
    model.eval()
    after = [fresh(k + 1) for k in range(args.repeats)]
    mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
    print(f"estimator={args.estimator} lr={args.lr} steps={args.steps} rollouts={args.prompts}x{args.group} "
          f"at {args.rollout_steps} steps: reward {mean(before, 0):.3f} -> {mean(after, 0):.3f}, "
          f"solved {mean(before, 1):.3f} -> {mean(after, 1):.3f} (fresh draws: {args.repeats})")


if __name__ == "__main__":
    main()
