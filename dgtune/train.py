"""`python -m dgtune.train recipe=sudoku`: supervised fine-tuning of a diffusion LM with its denoising objective.

`train(cfg)` is a plain function (tests call it); `main` is the thin Hydra wrapper. One training step, top to
bottom: draw a batch (a pure function of seed and step, so resumes are exact), compute the denoising loss
(`dgtune.diffusion.loss`), backward with gradient accumulation, clip, AdamW step, warmup + cosine schedule;
every `eval_every` steps a quick eval with the real sampler, every `ckpt_every` steps an atomic checkpoint.
At the end: the final adapter/model in `<run_dir>/final`, and the full eval report (`dgtune.eval`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dgtune.checkpoint import resume_state, save_checkpoint, save_weights, write_json
from dgtune.data import batch_indices, collate_train, encode_rows, splits_for
from dgtune.diffusion.loss import DenoisingLoss
from dgtune.diffusion.model_calls import unwrap
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.models.checkpointing import enable_gradient_checkpointing
from dgtune.models.family import family_of
from dgtune.models.load import load_model
from dgtune.run_folder import acquire_lock, release_lock, shared_run_dir, sweep_group
from dgtune.runtime import accelerator_session, environment, resolve_precision
from dgtune.tasks import build_task
from dgtune.tracking import Tracker, trim_metrics
from dgtune.validate import (CheckpointError, NonFiniteError, check_config, check_inputs, cli_errors,
                             quiet_third_party)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the peak learning rate."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_lora(model, cfg: DictConfig):
    """Wrap the model with LoRA adapters (peft) on `lora.target_modules`, or the model family's own pattern when it
    is null (`dgtune.models.family`); the router and base stay frozen."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.get("target_modules") or family_of(model).lora_target_modules,
        target_parameters=list(cfg.target_parameters) or None,
    )
    return get_peft_model(model, lcfg)


def freeze_router(model) -> int:
    """Freeze the MoE router's parameters (the model family's `router_param`) for a full fine-tune (everything else
    trains), TRL's default; `trainer.train_router=true` trains it too. Returns how many tensors were frozen."""
    router = family_of(model).router_param
    frozen = 0
    for name, p in model.named_parameters():
        if router is not None and router in name and p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def mixed_precision(cfg: DictConfig) -> str:
    """`trainer.mixed_precision` as accelerate takes it: 'auto' resolved by `dgtune.runtime.resolve_precision`."""
    return resolve_precision(cfg.trainer.mixed_precision, cfg.trainer.device)


def train(cfg: DictConfig) -> dict:
    """Train as configured; returns a summary dict (run_dir, steps, final loss, eval report path).

    With several processes (`accelerate launch` / `torchrun`) every process runs this function: each takes its
    `trainer.batch_size` rows of the step's global batch, gradients are all-reduced inside the prepared
    `DenoisingLoss`, and only the main process writes the run folder and runs the evals (the others wait).

    Before any folder is created the config is checked (`dgtune.validate.check_config`) and the inputs are read
    (test file, model folder); the run folder is then locked (`<run_dir>/.dgtune.lock`) while training runs."""
    check_config(cfg)
    quiet_third_party()
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    tc = cfg.trainer
    # This call's own accelerate state: a later train() in the same process may use another precision or device.
    with accelerator_session(
        mixed_precision=mixed_precision(cfg), cpu=tc.device == "cpu",
        # Not every parameter gets a gradient every step (MoE experts no token was routed to; with
        # objective.ar_weight=0 the encoder's last layer; the vision tower in a full fine-tune).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                         InitProcessGroupKwargs(timeout=timedelta(minutes=tc.dist_timeout_min))],
    ) as accelerator:
        return _setup_and_train(cfg, accelerator)


def _setup_and_train(cfg: DictConfig, accelerator) -> dict:
    """Inputs checked and read, the run folder chosen and locked, then `_train`."""
    main, world = accelerator.is_main_process, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # e.g. torchrun on a machine without GPUs and trainer.device=auto: each would train alone
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate set up {world} process(es) "
                           f"({accelerator.distributed_type}); on CPUs pass trainer.device=cpu")
    task = build_task(cfg.task)
    check_inputs(cfg, task)  # a bad test file or model folder fails now, not after training
    splits = splits_for(task, cfg)  # data files (e.g. task=jsonl) are read before the run folder exists
    if cfg.eval.at_end:  # a data task without test rows fails now, not after training
        from dgtune.eval.runner import require_test_rows

        require_test_rows(task, splits, cfg)
    if cfg.resume and cfg.run_dir and not (Path(cfg.run_dir) / "checkpoints").is_dir():
        raise CheckpointError(f"resume=true but {cfg.run_dir}/checkpoints has no complete checkpoint (no such folder)")
    run_dir, created = shared_run_dir(cfg, accelerator)
    lock = acquire_lock(run_dir) if main else None
    progress = {"started": False}  # set when the first training step begins
    try:
        return _train(cfg, accelerator, run_dir, task, splits, progress)
    except BaseException:
        if main and created and not progress["started"]:  # failed in set-up: leave nothing behind
            release_lock(lock)
            lock = None
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        release_lock(lock)


def _train(cfg: DictConfig, accelerator, run_dir, task, splits, progress: dict) -> dict:
    """The body of `train` once the run folder is chosen and locked; sets `progress["started"]` when the loop
    begins (a failure before that removes a run folder this call created)."""
    from tqdm import tqdm

    tc = cfg.trainer
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Model, task and data
    model, tokenizer = load_model(cfg.model)
    model.config.canvas_length = task.canvas_length
    fresh = bool(cfg.task.get("fresh", False))
    # task.fresh: each step's rows are generated (below), the cached train split is not used
    train_items = [] if fresh else encode_rows(tokenizer, splits["train"], task.canvas_length, task)
    global_batch = tc.batch_size * world
    if world > 1 and not fresh and len(train_items) < global_batch:
        raise ValueError(f"{len(train_items)} training examples < global batch {global_batch} "
                         f"(trainer.batch_size={tc.batch_size} x {world} processes)")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    elif not cfg.trainer.train_router:
        freeze_router(model)
    if cfg.trainer.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    # The module accelerate wraps is the whole loss, so DDP/FSDP hooks see every model call. The scheduler is
    # not prepared: accelerate would step it once per process per optimizer step.
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    )
    obj = ObjectiveConfig(**OmegaConf.to_container(cfg.objective, resolve=True))
    aux = None
    if obj.aux_weight > 0:
        aux = (task, torch.tensor(task.aux_token_ids(tokenizer)))
    loss_fn = DenoisingLoss(model, obj, unwrap(model).config.text_config.vocab_size, tokenizer.mask_token_id, aux)
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    inner = accelerator.unwrap_model(loss_fn).model  # the (peft) model: sampling, eval, checkpoints

    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "wandb_id": None, "num_processes": world}
    if cfg.resume:  # every process loads the checkpoint
        loaded = resume_state(run_dir, inner, optimizer, scheduler, accelerator.print)
        ckpt = loaded.pop("checkpoint")
        loaded.pop("skipped")
        state.update(loaded, num_processes=world)
        accelerator.print(f"[dgtune] resumed from {ckpt} at step {state['step']}")
        if main:
            dropped = trim_metrics(run_dir, state["step"])
            if dropped:
                accelerator.print(f"[dgtune] metrics.jsonl: dropped {dropped} record(s) logged after step "
                                  f"{state['step']} by the interrupted run")
    precision = accelerator.mixed_precision
    if state.get("precision", precision) != precision:
        accelerator.print(f"[dgtune] warning: resuming a run trained with mixed_precision={state['precision']} "
                          f"under {precision} (trainer.mixed_precision={tc.mixed_precision}): the rest of the run "
                          f"will not match an uninterrupted one")
    state["precision"] = precision
    env = environment(precision)
    if main:
        OmegaConf.save(cfg, run_dir / "config.yaml")
        write_json(run_dir / "environment.json", env)
    tracker = Tracker(run_dir, cfg.logger, {**OmegaConf.to_container(cfg, resolve=True), "environment": env},
                      run_dir.name, sweep_group(cfg), state.get("wandb_id"), enabled=main)
    state["wandb_id"] = tracker.run_id
    n_train = "fresh" if fresh else len(train_items)
    accelerator.print(f"[dgtune] run_dir={run_dir} trainable={n_trainable:,} params, train={n_train} "
                      f"examples, processes={world}, batch={tc.batch_size}/process ({global_batch} per micro-step), "
                      f"mixed_precision={precision} ({env['cpu'] if env['gpu'] is None else env['gpu']}, "
                      f"{env['torch_threads']} torch threads)")

    # The loop
    loss_fn.train()
    step, t_start = state["step"], time.perf_counter() - state["elapsed_s"]
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (tc.progress_bar and main))
    rows = slice(rank * tc.batch_size, (rank + 1) * tc.batch_size) if world > 1 else None
    window_tokens, window_t0, loss = 0, time.perf_counter(), None
    skips = 0  # consecutive steps skipped for a non-finite loss or gradient (trainer.on_nonfinite=skip)
    deadline = t_start + 60 * tc.max_minutes if tc.max_minutes else None
    progress["started"] = True
    while step < tc.max_steps:
        optimizer.zero_grad(set_to_none=True)
        logs = {}
        for micro in range(tc.grad_accum):
            # The global batch and its noise are pure functions of (seed, micro-step), the same on every
            # process; each process computes the loss of its rows. Gradients are all-reduced at the last micro.
            micro_step = step * tc.grad_accum + micro
            if fresh:  # task.fresh: newly generated rows, a pure function of (seed, micro-step)
                items = encode_rows(tokenizer, task.fresh_rows(global_batch, cfg.seed * 1_000_003 + micro_step),
                                    task.canvas_length, task)
            else:
                items = [train_items[i] for i in batch_indices(len(train_items), global_batch, micro_step, cfg.seed)]
            batch = {k: v.to(accelerator.device) for k, v in collate_train(items, tokenizer.pad_token_id).items()}
            gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1_000_003 + micro_step * 97)
            sync = contextlib.nullcontext() if micro == tc.grad_accum - 1 else accelerator.no_sync(loss_fn)
            with sync:
                with accelerator.autocast():
                    out = loss_fn(batch, gen, rows)
                accelerator.backward(out["loss"] / tc.grad_accum)
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() / tc.grad_accum
            window_tokens += int(batch["attention_mask"].sum()) + batch["canvas"].numel()
        grad_norm = accelerator.clip_grad_norm_(trainable, tc.max_grad_norm)
        logs = dict(zip(logs, accelerator.reduce(torch.stack(list(logs.values())), "mean").tolist()))  # over processes
        if math.isfinite(logs["loss"]) and math.isfinite(float(grad_norm)):  # the same verdict on every process
            optimizer.step()
            skips = 0
        else:
            skips = nonfinite_step(cfg, step + 1, logs["loss"], float(grad_norm), skips)
            optimizer.zero_grad(set_to_none=True)
            logs["skipped_nonfinite"] = 1.0
        scheduler.step()
        step += 1
        state["tokens"] += window_tokens
        loss = logs["loss"]
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.max_steps:
            dt = time.perf_counter() - window_t0
            tps = window_tokens / max(dt, 1e-9)
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            tracker.log({**{f"train/{k}": v for k, v in logs.items()}, "train/lr": lr, "train/grad_norm": float(grad_norm),
                         "train/tokens_per_s": tps, "train/elapsed_s": time.perf_counter() - t_start}, step)
            window_tokens, window_t0 = 0, time.perf_counter()
        if cfg.eval.quick_every and step % cfg.eval.quick_every == 0 and step < tc.max_steps:
            if main:
                tracker.log(quick_eval(inner, tokenizer, task, splits["val"], cfg, run_dir, step,
                                       step * global_batch * tc.grad_accum), step)
            accelerator.wait_for_everyone()
            loss_fn.train()
        out_of_time = deadline is not None and time.perf_counter() > deadline
        if deadline is not None and world > 1:  # every process stops at the same step
            out_of_time = bool(accelerator.reduce(torch.tensor(float(out_of_time), device=accelerator.device), "sum") > 0)
        if step % tc.ckpt_every == 0 or step == tc.max_steps or out_of_time:
            state["elapsed_s"] = time.perf_counter() - t_start
            if main:
                save_checkpoint(run_dir, step, inner, tokenizer, optimizer, scheduler, dict(state),
                                keep=tc.keep_checkpoints)
            accelerator.wait_for_everyone()
        if out_of_time:
            accelerator.print(f"[dgtune] trainer.max_minutes={tc.max_minutes} reached at step {step}")
            break
    bar.close()
    state["elapsed_s"] = time.perf_counter() - t_start
    evaluated = step % max(cfg.eval.quick_every, 1) == 0 and step < tc.max_steps  # by the loop, at this step
    if cfg.eval.quick_every and main and not evaluated:  # the learning curve's last point: the final weights
        tracker.log(quick_eval(inner, tokenizer, task, splits["val"], cfg, run_dir, step,
                               step * global_batch * tc.grad_accum), step)
    summary = {"run_dir": str(run_dir), "steps": step, "loss": loss, "train_minutes": state["elapsed_s"] / 60,
               "precision": precision}
    if main:
        save_weights(inner, tokenizer, run_dir / "final")
        from dgtune.export import write_generation_config

        write_generation_config(run_dir / "final", cfg, tokenizer, task.canvas_length)
        tracker.log({"train/minutes": summary["train_minutes"]}, step)
        if cfg.eval.at_end:
            from dgtune.eval.runner import run_report

            summary["report"] = run_report(inner, tokenizer, task, splits, cfg, run_dir, tracker,
                                           meta={"train_minutes": round(summary["train_minutes"], 2), "train_steps": step,
                                                 "train_precision": precision, "train_environment": env})
        tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.print(f"[dgtune] done: {run_dir} ({step} steps, {summary['train_minutes']:.1f} min); weights: "
                      f"{run_dir / 'final'}" + (f", report: {summary['report']}, plot: "
                                                 f"{Path(summary['report']).with_name('accuracy_vs_steps.png')}"
                                                 if summary.get("report") else ""))
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
    from dgtune.sampling.config import sampler_config
    from dgtune.eval.curve import append_point, curve_point
    from dgtune.eval.runner import evaluate

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


def main() -> None:
    """Hydra entry point (config groups in `configs/`, recipes in `recipes/`)."""
    import hydra

    from dgtune.config import config_dir, register_recipes
    from dgtune.validate import check_overrides

    with cli_errors():  # an unknown recipe or group option stops here, before Hydra runs the defaults
        check_overrides(sys.argv[1:])
    register_recipes()

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        with cli_errors():
            train(cfg)

    _run()


if __name__ == "__main__":
    sys.exit(main())
