"""What the training loop does around a method's steps, the same for every method (`dgtune.methods`): resume,
the run folder's records, logging, quick evals and the learning curve, checkpoints, the deadline, and at the end
the final weights and the report. Each is a plain function on `Run`, the state one training call shares."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dgtune.checkpoint import resume_state, save_checkpoint, save_weights, write_json
from dgtune.errors import NonFiniteError
from dgtune.run_folder import sweep_group
from dgtune.runtime import environment
from dgtune.tracking import Tracker, trim_metrics


@dataclass
class Run:
    """One training call: its config, accelerator, run folder, task and data, the (peft) model as sampling, eval
    and checkpoints use it (`model`, never the accelerate-wrapped module), tokenizer, optimizer and schedule, and
    the state a checkpoint saves (`state`: step, tokens, elapsed seconds, W&B id, processes, precision)."""

    cfg: DictConfig
    accelerator: object
    run_dir: Path
    task: object
    splits: dict
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: dict = field(default_factory=dict)
    tracker: Tracker | None = None
    env: dict = field(default_factory=dict)
    sharded: object = None  # trainer.strategy=fsdp2: the `dgtune.sharded.Sharded` whose replica `model` is

    def full_weights(self):
        """A context in which `model` holds the current weights whole on the main process (with sharded weights:
        the replica synced and on the device; every process enters it)."""
        return self.sharded.full_weights() if self.sharded is not None else contextlib.nullcontext()

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sequences_per_step(self) -> int:
        """Sequences one optimizer step trains on, over all processes."""
        tc = self.cfg.trainer
        return tc.batch_size * self.accelerator.num_processes * tc.grad_accum


def resume(run: Run) -> None:
    """With `resume=true`: load the newest loadable checkpoint on every process (weights, optimizer, schedule,
    RNG, state) and drop the metrics the interrupted run logged after it."""
    world = run.accelerator.num_processes
    run.state.update({"step": 0, "tokens": 0, "elapsed_s": 0.0, "wandb_id": None, "num_processes": world})
    if not run.cfg.resume:
        return
    loaded = resume_state(run.run_dir, run.model, run.optimizer, run.scheduler, run.accelerator.print,
                          sharded=run.sharded)
    ckpt = loaded.pop("checkpoint")
    loaded.pop("skipped")
    run.state.update(loaded, num_processes=world)
    run.accelerator.print(f"[dgtune] resumed from {ckpt} at step {run.state['step']}")
    if run.main:
        dropped = trim_metrics(run.run_dir, run.state["step"])
        if dropped:
            run.accelerator.print(f"[dgtune] metrics.jsonl: dropped {dropped} record(s) logged after step "
                                  f"{run.state['step']} by the interrupted run")


def start_records(run: Run) -> None:
    """The precision and machine (`environment.json`), the config (`config.yaml`) and the tracker (metrics.jsonl,
    W&B); warns when a resumed run continues under another precision."""
    precision = run.accelerator.mixed_precision
    if run.state.get("precision", precision) != precision:
        run.accelerator.print(f"[dgtune] warning: resuming a run trained with mixed_precision={run.state['precision']} "
                              f"under {precision} (trainer.mixed_precision={run.cfg.trainer.mixed_precision}): the "
                              f"rest of the run will not match an uninterrupted one")
    run.state["precision"] = precision
    run.env = environment(precision)
    if run.main:
        OmegaConf.save(run.cfg, run.run_dir / "config.yaml")
        write_json(run.run_dir / "environment.json", run.env)
    run.tracker = Tracker(run.run_dir, run.cfg.logger,
                          {**OmegaConf.to_container(run.cfg, resolve=True), "environment": run.env},
                          run.run_dir.name, sweep_group(run.cfg), run.state.get("wandb_id"), enabled=run.main)
    run.state["wandb_id"] = run.tracker.run_id


def log_step(run: Run, step: int, logs: dict, grad_norm: float, tokens: int, seconds: float, t_start: float, bar) -> None:
    """One metrics record: the step's losses, learning rate, gradient norm and tokens per second."""
    tps = tokens / max(seconds, 1e-9)
    lr = run.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
    run.tracker.log({**{f"train/{k}": v for k, v in logs.items()}, "train/lr": lr, "train/grad_norm": grad_norm,
                     "train/tokens_per_s": tps, "train/elapsed_s": time.perf_counter() - t_start}, step)


def quick_eval_point(run: Run, step: int) -> None:
    """A quick eval of the current weights (main process; a point of the learning curve); all processes wait."""
    with run.full_weights():
        if run.main:
            run.tracker.log(quick_eval(run.model, run.tokenizer, run.task, run.splits["val"], run.cfg, run.run_dir,
                                       step, step * run.sequences_per_step), step)
    run.accelerator.wait_for_everyone()


def past_deadline(run: Run, deadline: float | None) -> bool:
    """`trainer.max_minutes` reached (on any process: every process stops at the same step)."""
    out = deadline is not None and time.perf_counter() > deadline
    if deadline is not None and run.accelerator.num_processes > 1:
        acc = run.accelerator
        out = bool(acc.reduce(torch.tensor(float(out), device=acc.device), "sum") > 0)
    return out


def checkpoint(run: Run, step: int, t_start: float) -> None:
    """An atomic checkpoint of step `step` (main process); all processes wait."""
    run.state["elapsed_s"] = time.perf_counter() - t_start
    extra = {}
    if run.sharded is not None:  # whole tensors, gathered by every process for the main one
        extra = {"trainable": run.sharded.sync(), "optimizer_state": run.sharded.optimizer_state(run.optimizer)}
    if run.main:
        save_checkpoint(run.run_dir, step, run.model, run.tokenizer, run.optimizer, run.scheduler, dict(run.state),
                        keep=run.cfg.trainer.keep_checkpoints, **extra)
    run.accelerator.wait_for_everyone()


def finish(run: Run, step: int, loss: float | None, t_start: float, evaluated: bool) -> dict:
    """The learning curve's last point (unless the loop just evaluated), the final weights with their generation
    config, and the full report (`eval.at_end`); returns the run's summary."""
    cfg = run.cfg
    run.state["elapsed_s"] = time.perf_counter() - t_start
    precision = run.state["precision"]
    summary = {"run_dir": str(run.run_dir), "steps": step, "loss": loss, "train_minutes": run.state["elapsed_s"] / 60,
               "precision": precision}
    with run.full_weights():  # sharded runs: the replica, synced and on the device
        if cfg.eval.quick_every and run.main and not evaluated:  # the learning curve's last point: the final weights
            run.tracker.log(quick_eval(run.model, run.tokenizer, run.task, run.splits["val"], cfg, run.run_dir, step,
                                       step * run.sequences_per_step), step)
        if run.main:
            save_weights(run.model, run.tokenizer, run.run_dir / "final")
            from dgtune.export import write_generation_config

            write_generation_config(run.run_dir / "final", cfg, run.tokenizer, run.task.canvas_length)
            run.tracker.log({"train/minutes": summary["train_minutes"]}, step)
            if cfg.eval.at_end:
                from dgtune.eval.runner import run_report
                from dgtune.sweep import validation_objective

                # what sweepers optimise: a validation figure (dgtune/sweep.py), never the test split's
                objective = summary["objective"] = validation_objective(run.model, run.tokenizer, run.task,
                                                                        run.splits["val"], cfg)
                write_json(run.run_dir / "objective.json", objective)
                run.tracker.log({"sweep/objective": objective["value"]}, step)
                run.accelerator.print(f"[dgtune] objective: {objective['metric']}={objective['value']:.4f} "
                                      f"({objective['n']} validation rows)")
                meta = {"train_minutes": round(summary["train_minutes"], 2), "train_steps": step,
                        "train_precision": precision, "train_environment": run.env, "objective": objective}
                summary["report"] = run_report(run.model, run.tokenizer, run.task, run.splits, cfg, run.run_dir,
                                               run.tracker, meta=meta)
            run.tracker.finish()
    run.accelerator.wait_for_everyone()
    report = summary.get("report")
    run.accelerator.print(f"[dgtune] done: {run.run_dir} ({step} steps, {summary['train_minutes']:.1f} min); weights: "
                          f"{run.run_dir / 'final'}" + (f", report: {report}, plot: "
                                                        f"{Path(report).with_name('accuracy_vs_steps.png')}"
                                                        if report else ""))
    return summary


def nonfinite_step(cfg: DictConfig, step: int, loss: float, grad_norm: float, skips: int) -> int:
    """A step with a non-finite loss or gradient: raise NonFiniteError (`trainer.on_nonfinite=stop`, the
    default), or skip it with a message and return the count of consecutive skips (`skip`, at most
    `trainer.max_consecutive_skips` in a row). The optimizer has not stepped: the weights stay finite."""
    tc = cfg.trainer
    what = f"step {step}: loss={loss} grad_norm={grad_norm} is not finite"
    if tc.get("on_nonfinite", "stop") != "skip":
        raise NonFiniteError(f"{what}; stopped before the optimizer step, the saved checkpoints hold the last finite "
                             f"weights (lower trainer.lr={tc.lr}, or skip such steps with trainer.on_nonfinite=skip)")
    skips += 1
    limit = tc.get("max_consecutive_skips", 10)
    if skips > limit:
        raise NonFiniteError(f"{what}; {skips} steps in a row skipped (trainer.max_consecutive_skips={limit}): "
                             f"stopped, the saved checkpoints hold the last finite weights (lower trainer.lr={tc.lr})")
    print(f"[dgtune] {what}: step skipped (trainer.on_nonfinite=skip)", file=sys.stderr)
    return skips


def quick_eval(model, tokenizer, task, val_rows, cfg, run_dir=None, step: int = 0, sequences: int = 0) -> dict:
    """Solved rate and cell accuracy on the first `eval.quick_n` validation rows (of bucket `eval.quick_bucket`,
    when set) at `eval.quick_steps`; with `run_dir`, also a point of the learning curve (`dgtune.eval.curve`)."""
    from dgtune.eval.curve import append_point, curve_point
    from dgtune.eval.runner import evaluate
    from dgtune.sampling.config import sampler_config

    bucket = cfg.eval.get("quick_bucket")
    rows = [r for r in val_rows if not bucket or r.get("bucket") == bucket][: cfg.eval.quick_n]
    if not rows:
        raise ValueError(f"eval.quick_bucket={bucket!r}: no validation row has that bucket")
    records, _ = evaluate(model, tokenizer, task, rows, cfg.eval.quick_steps, sampler_config(cfg), cfg.eval.batch_size,
                          cfg.seed, "tuned")
    out = {}
    for s in cfg.eval.quick_steps:
        rs = [r for r in records if r["steps"] == s]
        out[f"val/solved@{s}"] = sum(r["solved"] for r in rs) / len(rs)
        out[f"val/cell_acc@{s}"] = sum(r["cell_acc"] for r in rs) / len(rs)
    print("[dgtune] quick eval:", " ".join(f"{k}={v:.3f}" for k, v in out.items()))
    if run_dir is not None:
        append_point(run_dir, curve_point(step, sequences, records, list(cfg.eval.quick_steps)))
    return out
