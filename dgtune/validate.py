"""Start-up checks: the config's types and values, and the input files, before any run folder is created.

`check_config(cfg)` walks a plain table of rules (key -> what is allowed) and raises `ConfigError` naming the key,
the value and what is allowed. `check_inputs(cfg, task)` reads the test file and checks the model folder, so a bad
file fails before training, not after. `cli_errors()` turns dgtune's own errors into one line on stderr and exit
code 2 in the command-line entry points (bugs keep their tracebacks).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

from omegaconf import DictConfig, ListConfig, OmegaConf

from dgtune.runtime import PRECISIONS
from dgtune.models.built import BUILT
from dgtune.sampling.strategies import SCHEDULES, STRATEGIES


# The error classes live in dgtune.errors (no import circle); they are re-exported here for existing imports.
from dgtune.errors import (CheckpointError, ConfigError, DgtuneError, InputError, ModelNotAvailableError,  # noqa: E402,F401
                           NonFiniteError, RunLockedError, SaveError, SudokuFormatError)


def _int(lo=None, hi=None, none=False):
    def check(v):
        if v is None:
            return none
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)

    what = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    return check, what + (" or null" if none else "")


def _num(lo=None, hi=None, lo_open=False, hi_open=False, none=False):
    def check(v):
        if v is None:
            return none
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return check, "a finite number" + (" " + " and ".join(parts) if parts else "") + (" or null" if none else "")


def _bool():
    return (lambda v: isinstance(v, bool)), "true or false"


def _choice(*options):
    return (lambda v: v in options), "one of " + ", ".join(str(o) for o in options)


def _str(none=False):
    return (lambda v: (v is None and none) or (isinstance(v, str) and v != "")), "a non-empty string" + (" or null" if none else "")


def _int_list(lo=1, empty=False):
    def check(v):
        return (isinstance(v, (list, tuple)) and (empty or len(v) > 0)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v))

    return check, f"a {'' if empty else 'non-empty '}list of integers >= {lo}, e.g. [1,4,12]"


RULES = {
    "seed": _int(0),
    "resume": _bool(),
    "trainer.max_steps": _int(1),
    "trainer.max_minutes": _num(0, lo_open=True, none=True),
    "trainer.batch_size": _int(1),
    "trainer.grad_accum": _int(1),
    "trainer.lr": _num(0, lo_open=True),
    "trainer.weight_decay": _num(0),
    "trainer.warmup_steps": _int(0),
    "trainer.min_lr_ratio": _num(0, 1),
    "trainer.max_grad_norm": _num(0, lo_open=True),
    "trainer.train_router": _bool(),
    "trainer.mixed_precision": _choice("auto", *PRECISIONS),
    "trainer.device": _choice("auto", "cpu"),
    "trainer.strategy": _choice("ddp", "fsdp2"),
    "trainer.gradient_checkpointing": _bool(),
    "trainer.log_every": _int(1),
    "trainer.ckpt_every": _int(1),
    "trainer.keep_checkpoints": _int(0),
    "trainer.progress_bar": _bool(),
    "trainer.dist_timeout_min": _num(0, lo_open=True),
    "trainer.on_nonfinite": _choice("stop", "skip"),
    "trainer.max_consecutive_skips": _int(1),
    "eval.steps": _int_list(1),
    "eval.batch_size": _int(1),
    "eval.compare_base": _bool(),
    "eval.at_end": _bool(),
    "eval.max_rows": _int(1, none=True),
    "eval.out_dir": _str(none=True),
    "eval.overwrite": _bool(),
    "eval.quick_every": _int(0),
    "eval.quick_n": _int(1),
    "eval.quick_steps": _int_list(1),
    "eval.guided": _bool(),
    "eval.on_verifier_error": _choice("fail", "count"),
    "task.n_train": _int(0),
    "task.n_val": _int(0),
    "task.n_test": _int(0),
    "task.seed": _int(0),
    "task.canvas_length": _int(1),
    "task.test_file": _str(none=True),
    "task.compact_prompt": _bool(),
    "task.fresh": _bool(),
    "task.fresh_per_base": _int(1),
    "task.layout": _choice("flat", "boxes"),
    "eval.quick_bucket": _str(none=True),
    "objective.aux_weight": _num(0),
    "objective.loss_chunk": _int(0),
    "objective.self_cond_p": _num(0, 1),
    "objective.ar_weight": _num(0),
    "sampler.strategy": _choice(*STRATEGIES),
    "sampler.mode": _choice("reference", "fast"),
    "sampler.noise": _choice("uniform", "mask"),
    "sampler.commit": _choice("sample", "argmax"),
    "sampler.schedule": _choice(*SCHEDULES),
    "sampler.last_step": _choice("argmax", "sample"),
    "sampler.prediction": _choice("denoiser", "mean_loo"),
    "sampler.decoder": _choice("auto", "fused", "transformers"),
    "sampler.decoder_dtype": _choice("auto", "fast", "float32", "bfloat16"),
    "sampler.stats_backend": _choice("auto", "torch", "triton"),
    "sampler.max_steps": _int(1),
    "sampler.max_canvases": _int(1),
    "sampler.t_min": _num(0, lo_open=True),
    "sampler.t_max": _num(0, lo_open=True),
    "lora.enabled": _bool(),
    "model.source": _choice("bundled", "pretrained", *BUILT),
}
LORA_RULES = {"lora.r": _int(1), "lora.alpha": _num(0, lo_open=True), "lora.dropout": _num(0, 1, hi_open=True),
              "lora.experts": _bool()}
# model keys read by some sources only: set (not null) under another source they would be silently ignored
MODEL_KEY_SOURCES = {
    "name_or_path": ("pretrained",),
    "dtype": ("bundled", "pretrained"),
    "attn_implementation": ("bundled", "pretrained"),
    "trust_remote_code": ("bundled", "pretrained"),
    "device_map": ("bundled", "pretrained"),
    "init_seed": tuple(BUILT),
    "sizes": tuple(BUILT),
}


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def check_config(cfg: DictConfig, sections=("trainer", "eval", "task", "sampler", "lora", "model", "objective")) -> None:
    """Raise ConfigError for the first key of `sections` with a wrong type or impossible value (absent keys are
    not checked: older run configs lack newer keys), or a model key the chosen `model.source` ignores."""
    rules = dict(RULES)
    if "lora" in cfg and cfg.lora.get("enabled"):
        rules.update(LORA_RULES)
    for key, (ok, allowed) in rules.items():
        if "." in key and key.split(".")[0] not in sections:
            continue
        value = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
        if value == "__absent__":
            continue
        value = _plain(value)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
    if "model" in sections and "model" in cfg:
        _check_model(cfg.model)
    if "objective" in sections and cfg.get("objective") is not None and cfg.objective.get("kind") is not None:
        from dgtune.diffusion.objective import NOISES

        if cfg.objective.kind not in NOISES:
            raise ConfigError(f"objective.kind={cfg.objective.kind!r} is not allowed: expected one of {', '.join(NOISES)}")
    if "trainer" in sections and cfg.get("method") is not None:
        from dgtune.methods import method_class

        method_class(cfg)  # the name is registered (its module imported)
        if (cfg.trainer.get("strategy") == "fsdp2" and not cfg.lora.get("enabled")
                and cfg.objective.get("self_cond_p", 0) > 0):
            raise ConfigError("trainer.strategy=fsdp2 with a full fine-tune (lora=none) takes objective.self_cond_p=0: "
                              "the tied encoder/decoder layers form one FSDP2 unit, which torch 2.13 cannot run twice "
                              "before backward (dgtune/sharded.py: untie_frozen_shared)")
        if cfg.trainer.get("strategy") == "fsdp2" and cfg.model.get("quantization"):
            raise ConfigError(f"trainer.strategy=fsdp2 does not take model.quantization={cfg.model.quantization} "
                              "(bitsandbytes weights are not sharded by FSDP2 here): use trainer.strategy=ddp")
        if cfg.trainer.get("strategy") == "fsdp2" and cfg.method.get("name", "sft") != "sft":
            raise ConfigError(f"trainer.strategy=fsdp2 trains method=sft only (method={cfg.method.name}: its rollouts "
                              "sample the sharded model outside the loss; use trainer.strategy=ddp)")
    if "sampler" in sections and "sampler" in cfg:
        t_min, t_max = cfg.sampler.get("t_min"), cfg.sampler.get("t_max")
        if isinstance(t_min, (int, float)) and isinstance(t_max, (int, float)) and t_min > t_max:
            raise ConfigError(f"sampler.t_min={t_min} is above sampler.t_max={t_max}")
    betas = _plain(OmegaConf.select(cfg, "trainer.betas", default=None))
    if "trainer" in sections and betas is not None and not (
            isinstance(betas, list) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"trainer.betas={betas!r} is not allowed: expected two numbers in [0, 1), e.g. [0.9,0.99]")


def _check_model(mcfg: DictConfig) -> None:
    source = mcfg.get("source")
    for key, value in mcfg.items():
        sources = MODEL_KEY_SOURCES.get(key)
        if value is None or sources is None or source in sources:
            continue
        hint = " (to load your own folder or Hub id use model.source=pretrained)" if key == "name_or_path" else ""
        raise ConfigError(f"model.{key}={_plain(value)!r} is ignored by model.source={source}; it is read only "
                          f"with model.source={' or '.join(sources)}{hint}")
    if source == "pretrained" and not mcfg.get("name_or_path"):
        raise ConfigError("model.source=pretrained needs model.name_or_path (a Hub id or a local folder)")


def check_inputs(cfg: DictConfig, task) -> list[dict] | None:
    """Read and check the inputs a run needs before it starts: the test file (`task.test_file`, via the task's
    own reader, which names file and line) and the model folder (`dgtune.models.load.check_model_files`).
    Returns the test rows of the test file, or None when the run uses its generated test split."""
    from dgtune.models.load import check_model_files

    check_model_files(cfg.model)
    check_task_features(cfg, task)
    if not cfg.task.get("test_file"):
        return None
    if not hasattr(task, "load_test_file"):
        raise InputError(f"task.test_file={cfg.task.test_file!r}: task {task.name!r} does not read test files")
    return task.load_test_file(cfg.task.test_file)


def check_task_features(cfg: DictConfig, task) -> None:
    """Settings that need something the task may not have: `eval.guided=true` needs the task's rule checker
    (`make_guide`), `objective.aux_weight` > 0 its auxiliary loss, `task.fresh=true` its generator."""
    if cfg.get("eval", {}).get("guided") and not hasattr(task, "make_guide"):
        raise ConfigError(f"eval.guided=true: task {task.name!r} has no rule checker for guided sampling "
                          "(sudoku and coloring have one); set eval.guided=false")
    aux = cfg.get("objective", {}).get("aux_weight") or 0
    if aux > 0 and not hasattr(task, "aux_loss"):
        raise ConfigError(f"objective.aux_weight={aux}: task {task.name!r} has no auxiliary loss; set it to 0")
    if cfg.get("task", {}).get("fresh") and not hasattr(task, "fresh_rows"):
        raise ConfigError(f"task.fresh=true: task {task.name!r} cannot generate fresh training rows")


USER_ERRORS: tuple = (DgtuneError, FileNotFoundError, FileExistsError, KeyError)


@contextlib.contextmanager
def cli_errors():
    """In a command-line entry point: print dgtune's own errors (bad config, bad files, locked run folder, a
    non-finite loss, a failing verifier, ...) as one line `dgtune: error: ...` on stderr and exit with code 2.
    `DGTUNE_DEBUG=1` lets them through with their tracebacks."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("DGTUNE_DEBUG", "") not in ("", "0"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"dgtune: error: {msg}", file=sys.stderr)
        sys.exit(2)


def check_overrides(args: list[str]) -> None:
    """Command-line choices of config groups name options that exist: `recipe=NAME` a file in `recipes/`,
    `task=NAME` one in `configs/task/`, and so on (each value of a sweep `-m task=a,b` too). Hydra itself would
    skip an unknown recipe silently (the recipe group is optional) and run the defaults."""
    from dgtune.config import config_dir, recipes_dir

    groups = {p.name: sorted(x.stem for x in p.glob("*.yaml")) for p in config_dir().iterdir()
              if p.is_dir() and p.name != "accelerate"}  # configs/accelerate holds accelerate's files, not a group
    groups["recipe"] = sorted(x.stem for x in recipes_dir().glob("*.yaml"))
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "(" in value:  # sweep functions (choice(...), glob(...)) are Hydra's to read
            continue
        for name in value.split(","):
            if name not in groups[key]:
                raise ConfigError(f"{key}={name!r}: no such {key} (available: {', '.join(groups[key])})")


def quiet_third_party() -> None:
    """Silence third-party noise on normal runs: transformers' deprecation FutureWarnings raised by its own
    code, and matplotlib's INFO/DEBUG logging."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
