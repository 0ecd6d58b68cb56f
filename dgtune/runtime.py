"""What a run runs on: the precision `auto` resolves to, one accelerate state per call, and the facts a report
records so that a figure can be traced to the machine and settings that produced it.

- `resolve_precision`: `trainer.mixed_precision=auto` is bf16 on a GPU with bf16 (fp16 on an older one) and on a
  CPU with AVX512-BF16/AMX, else `no`. The environment variable `DGTUNE_AUTO_PRECISION=no|bf16|fp16` fixes what
  `auto` resolves to (tests and CI run the training tests under both outcomes with it); an explicit
  `trainer.mixed_precision` always wins.
- `accelerator_session`: accelerate keeps process-wide singletons (`AcceleratorState`, `GradientState`) that refuse
  a second `Accelerator` with other settings. Each `train()` call sets them up and tears them down, so calls with
  different precision or device can follow each other in one process (a notebook, an in-process sweep).
- `environment`: precision, torch threads, CPU model and its bf16 support, GPU, library versions.
"""

from __future__ import annotations

import contextlib
import os
import platform
from functools import lru_cache

import torch

AUTO_ENV = "DGTUNE_AUTO_PRECISION"
PRECISIONS = ("no", "bf16", "fp16")


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 kernels (AVX512-BF16 or AMX), as torch's CPU autocast sees it."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if check is not None:
        return bool(check())
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: str = "auto") -> str:
    """The accelerate `mixed_precision` for `trainer.mixed_precision=requested` on `trainer.device=device`.

    Anything but `auto` is returned as given. `auto`: the value of `DGTUNE_AUTO_PRECISION` when set, else bf16 on
    a CUDA GPU with bf16 (fp16 without), bf16 on a CPU with bf16 kernels, and `no` (fp32) on other CPUs."""
    if requested != "auto":
        return requested
    forced = os.environ.get(AUTO_ENV, "").strip()
    if forced:
        if forced not in PRECISIONS:
            from dgtune.errors import ConfigError

            raise ConfigError(f"environment variable {AUTO_ENV}={forced!r} (what trainer.mixed_precision=auto "
                              f"resolves to) must be one of {', '.join(PRECISIONS)}")
        return forced
    if device != "cpu" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_supported() else "no"


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (precision, device, gradient accumulation), so that the next
    `Accelerator` may be built with other settings. An initialised process group is kept (and so is the
    distributed part of the state, which describes it): only single-process state is dropped entirely."""
    from accelerate.state import AcceleratorState, GradientState

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()


@contextlib.contextmanager
def accelerator_session(**kwargs):
    """An `accelerate.Accelerator(**kwargs)` that owns the process's accelerate state for the `with` block:
    earlier state is dropped before it is built and its own state is dropped after (even on an error)."""
    from accelerate import Accelerator

    reset_accelerate_state()
    try:
        yield Accelerator(**kwargs)
    finally:
        reset_accelerate_state()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(precision: str | None = None) -> dict:
    """The facts that decide a run's numbers and speed: the precision used (accelerate's `mixed_precision`, when
    given), torch's thread count, the CPU and whether it has bf16 kernels, the GPU, and the library versions."""
    import accelerate
    import transformers

    env = {
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": cpu_bf16_supported(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    with contextlib.suppress(ImportError):
        import peft

        env["peft"] = peft.__version__
    if precision is None:
        env.pop("precision")
    return env
