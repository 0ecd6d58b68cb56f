"""`python -m dgtune.train recipe=sudoku`: fine-tune a diffusion LM (supervised with its denoising objective by
default: `method=sft`, `dgtune.methods`).

`train(cfg)` is a plain function (tests call it); `main` is the thin Hydra wrapper. One training step, top to
bottom: the method's micro-steps (SFT: draw a batch, a pure function of seed and step so resumes are exact, and
compute the denoising loss, `dgtune.diffusion.loss`), backward with gradient accumulation, clip, AdamW step,
warmup + cosine schedule; every `eval.quick_every` steps a quick eval with the real sampler, every
`trainer.ckpt_every` steps an atomic checkpoint (`dgtune.hooks`, the same for every method). At the end: the final
adapter/model in `<run_dir>/final`, and the full eval report (`dgtune.eval`).
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
from omegaconf import DictConfig

from dgtune import hooks
from dgtune.data import splits_for
from dgtune.models.checkpointing import enable_gradient_checkpointing
from dgtune.models.family import family_of
from dgtune.models.load import load_model
from dgtune.methods import method_class, method_name
from dgtune.run_folder import acquire_lock, release_lock, shared_run_dir
from dgtune.runtime import accelerator_session, resolve_precision
from dgtune.sharded import full_grad_norm_clip
from dgtune.sweep import objective_spec
from dgtune.tasks import build_task
from dgtune.validate import CheckpointError, check_config, check_inputs, cli_errors, quiet_third_party
from dgtune.warm_start import check_init_from, load_init


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the peak learning rate."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_lora(model, cfg: DictConfig):
    """Wrap the model with LoRA adapters (peft) on `lora.target_modules`, or the model family's own pattern when it
    is null (`dgtune.models.family`); with `lora.experts=true` also on the routed experts' 3-D parameters (peft's
    `target_parameters`, the family's `expert_parameters`); the router and base stay frozen."""
    from peft import LoraConfig, get_peft_model

    family = family_of(model)
    params = list(cfg.get("target_parameters") or [])
    if cfg.get("experts"):
        if not family.expert_parameters:
            from dgtune.errors import ConfigError

            raise ConfigError(f"lora.experts=true: model family {family.name} names no expert parameters")
        params += [p for p in family.expert_parameters if p not in params]
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.get("target_modules") or family.lora_target_modules,
        target_parameters=params or None,
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
    objective_spec(cfg)  # a bad sweep.metric fails now, not after training
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
    check_init_from(cfg)  # init_from: a finished run of the same model and task
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

    # Model, adapters and the method's loss module
    model, tokenizer = load_model(cfg.model)
    model.config.canvas_length = task.canvas_length
    warm = load_init(model, cfg)  # init_from: a finished run's adapter (trainable) or full model
    if warm is not None:
        model = warm
    elif cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if not hasattr(model, "peft_config") and not cfg.trainer.train_router:
        freeze_router(model)
    if cfg.trainer.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method = method_class(cfg)(cfg, task, splits, model, tokenizer, world)

    # The module accelerate wraps (or FSDP2 shards) is the method's whole loss, so DDP/FSDP hooks see every model
    # call. The scheduler is not prepared: accelerate would step it once per process per optimizer step.
    sharded = None
    if tc.strategy == "fsdp2":  # dgtune/sharded.py: layer units + the loss as root; sampling reads a replica
        from dgtune.sharded import Sharded, ensure_process_group

        ensure_process_group(accelerator)
        sharded = Sharded(method.module, family_of(model).shard_units, main, accelerator.device)
    trainable = [p for p in method.module.parameters() if p.requires_grad]  # (sharded: the DTensor parameters)
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    )
    if sharded is None:
        loss_fn, optimizer = accelerator.prepare(method.module, optimizer)
        inner = accelerator.unwrap_model(loss_fn).model  # the (peft) model: sampling, eval, checkpoints
    else:
        loss_fn, inner = method.module, sharded.model  # inner: the main process' unsharded replica
    run = hooks.Run(cfg, accelerator, run_dir, task, splits, inner, tokenizer, optimizer, scheduler, sharded=sharded)
    hooks.resume(run)
    hooks.start_records(run)
    env, state = run.env, run.state
    accelerator.print(f"[dgtune] run_dir={run_dir} method={method_name(cfg)} trainable={n_trainable:,} params, "
                      f"{method.describe()}, processes={world}, batch={tc.batch_size}/process "
                      f"({tc.batch_size * world} per micro-step), mixed_precision={state['precision']} "
                      f"({env['cpu'] if env['gpu'] is None else env['gpu']}, {env['torch_threads']} torch threads)")

    # The loop
    loss_fn.train()
    step, t_start = state["step"], time.perf_counter() - state["elapsed_s"]
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (tc.progress_bar and main))
    rows = slice(rank * tc.batch_size, (rank + 1) * tc.batch_size) if world > 1 else None
    window_tokens, window_t0, loss = 0, time.perf_counter(), None
    skips = 0  # consecutive steps skipped for a non-finite loss or gradient (trainer.on_nonfinite=skip)
    deadline = t_start + 60 * tc.max_minutes if tc.max_minutes else None
    block = getattr(method, "steps_per_block", 1)  # a method's steps that share state (RL: one rollout block)
    progress["started"] = True
    while step < tc.max_steps:
        optimizer.zero_grad(set_to_none=True)
        logs = {}
        for micro in range(tc.grad_accum):
            # The method's micro-step is a pure function of (seed, micro-step), the same on every process; each
            # process computes the loss of its rows. Gradients are all-reduced at the last micro-step.
            last = micro == tc.grad_accum - 1
            sync = contextlib.nullcontext() if last or sharded else accelerator.no_sync(loss_fn)
            with sync:
                with accelerator.autocast():
                    out, tokens = method.micro_step(loss_fn, step * tc.grad_accum + micro, accelerator.device, rows)
                accelerator.backward(out["loss"] / tc.grad_accum)
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() / tc.grad_accum
            window_tokens += tokens
        grad_norm = (accelerator.clip_grad_norm_(trainable, tc.max_grad_norm) if sharded is None
                     else full_grad_norm_clip(trainable, tc.max_grad_norm))
        logs = dict(zip(logs, accelerator.reduce(torch.stack(list(logs.values())), "mean").tolist()))  # over processes
        if float(grad_norm) == 0.0:  # no training signal (rft approved nothing, every GRPO group was flat): an
            # optimizer step would still move the weights (Adam re-applies its momentum, weight decay shrinks them)
            optimizer.zero_grad(set_to_none=True)
            logs["skipped_empty"] = 1.0
        elif math.isfinite(logs["loss"]) and math.isfinite(float(grad_norm)):  # the same verdict on every process
            optimizer.step()
            skips = 0
        else:
            skips = hooks.nonfinite_step(cfg, step + 1, logs["loss"], float(grad_norm), skips)
            optimizer.zero_grad(set_to_none=True)
            logs["skipped_nonfinite"] = 1.0
        scheduler.step()
        step += 1
        state["tokens"] += window_tokens
        loss = logs["loss"]
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.max_steps:
            hooks.log_step(run, step, logs, float(grad_norm), window_tokens, time.perf_counter() - window_t0, t_start,
                           bar)
            window_tokens, window_t0 = 0, time.perf_counter()
        if cfg.eval.quick_every and step % cfg.eval.quick_every == 0 and step < tc.max_steps:
            hooks.quick_eval_point(run, step)
            loss_fn.train()
        out_of_time = hooks.past_deadline(run, deadline) and step % block == 0  # stop at a block boundary
        if step % tc.ckpt_every == 0 or step == tc.max_steps or out_of_time:
            hooks.checkpoint(run, step, t_start)
        if out_of_time:
            accelerator.print(f"[dgtune] trainer.max_minutes={tc.max_minutes} reached at step {step}")
            break
    bar.close()
    evaluated = step % max(cfg.eval.quick_every, 1) == 0 and step < tc.max_steps  # by the loop, at this step
    return hooks.finish(run, step, loss, t_start, evaluated)


def main() -> None:
    """Hydra entry point (config groups in `configs/`, recipes in `recipes/`)."""
    import hydra

    from dgtune.config import config_dir, register_configs
    from dgtune.validate import check_overrides

    with cli_errors():  # an unknown recipe or group option stops here, before Hydra runs the defaults
        check_overrides(sys.argv[1:])
    register_configs()

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> float | None:
        with cli_errors():
            summary = train(cfg)
        objective = summary.get("objective")
        return None if objective is None else objective["value"]  # what a Hydra sweeper (Optuna) optimises

    _run()


if __name__ == "__main__":
    sys.exit(main())
