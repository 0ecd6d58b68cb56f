"""Training methods: what one micro-step of `dgtune.train` computes.

A method builds the module accelerate wraps (`method.module`: the whole loss, so DDP / FSDP hooks see every model
call) and, for each micro-step, returns the loss dict of this process' rows and the tokens it processed. The
training loop does the rest the same way for every method: gradient accumulation, clipping, the optimizer and
schedule, non-finite steps, logging, quick evals and the learning curve, checkpoints and exact resume, the
deadline, the final weights and report (`dgtune.hooks`). A method joins `METHODS` where it is defined
(`@register_method("sft")`); `method.name` in the config (`configs/method/`) picks it.
"""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf

from dgtune.data import batch_indices, collate_train, encode_rows
from dgtune.diffusion.loss import DenoisingLoss
from dgtune.diffusion.model_calls import vocab_size
from dgtune.diffusion.objective import ObjectiveConfig

METHODS: dict[str, Callable] = {}  # method.name -> class(cfg, task, splits, model, tokenizer, world)


def register_method(name: str):
    """Class decorator: the method `method.name=name` builds."""

    def deco(cls):
        METHODS[name] = cls
        return cls

    return deco


def method_class(cfg):
    """The class of `cfg.method.name`: registered by dgtune's own methods, or by the module `cfg.method.module`
    names (imported here: `dgtune.rl.method` for `method=rl`, or your own); ConfigError listing the known names."""
    import importlib

    from dgtune.errors import ConfigError

    name = method_name(cfg)
    module = (cfg.get("method") or {}).get("module")
    if name not in METHODS and module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"method.module={module!r} cannot be imported ({e})") from e
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not allowed: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def method_name(cfg) -> str:
    """`cfg.method.name`, "sft" for runs saved before methods were configurable."""
    method = cfg.get("method")
    return "sft" if method is None else method.get("name", "sft")


@register_method("sft")
class SFT:
    """Supervised fine-tuning with the denoising objective (`dgtune.diffusion.loss`). Each micro-step draws the
    global batch (a pure function of seed and micro-step, so a resumed run draws what an uninterrupted one would),
    its noise from a generator seeded the same way, and computes the loss of this process' rows."""

    def __init__(self, cfg, task, splits, model, tokenizer, world: int):
        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.fresh = bool(cfg.task.get("fresh", False))
        # task.fresh: each step's rows are generated (below), the cached train split is not used
        self.items = [] if self.fresh else encode_rows(tokenizer, splits["train"], task.canvas_length, task)
        self.global_batch = cfg.trainer.batch_size * world
        if world > 1 and not self.fresh and len(self.items) < self.global_batch:
            raise ValueError(f"{len(self.items)} training examples < global batch {self.global_batch} "
                             f"(trainer.batch_size={cfg.trainer.batch_size} x {world} processes)")
        obj = ObjectiveConfig(**OmegaConf.to_container(cfg.objective, resolve=True))
        aux = (task, torch.tensor(task.aux_token_ids(tokenizer))) if obj.aux_weight > 0 else None
        self.module = DenoisingLoss(model, obj, vocab_size(model), tokenizer.mask_token_id, aux, world)

    def describe(self) -> str:
        """What it trains on, for the start-up line."""
        return f"train={'fresh' if self.fresh else len(self.items)} examples"

    def micro_step(self, module, micro_step: int, device, rows: slice | None) -> tuple[dict, int]:
        """(loss dict of this process' rows, tokens in the global batch) for micro-step `micro_step`; `module` is
        `self.module` as accelerate prepared it."""
        cfg = self.cfg
        if self.fresh:  # task.fresh: newly generated rows, a pure function of (seed, micro-step)
            items = encode_rows(self.tokenizer, self.task.fresh_rows(self.global_batch, cfg.seed * 1_000_003 + micro_step),
                                self.task.canvas_length, self.task)
        else:
            items = [self.items[i] for i in batch_indices(len(self.items), self.global_batch, micro_step, cfg.seed)]
        batch = {k: v.to(device) for k, v in collate_train(items, self.tokenizer.pad_token_id).items()}
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + micro_step * 97)
        out = module(batch, gen, rows)
        return out, int(batch["attention_mask"].sum()) + batch["canvas"].numel()
