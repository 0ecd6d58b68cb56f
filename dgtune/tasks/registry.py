"""Task names -> builders. Each task module registers its builder where the task is defined
(`@register_task("countdown")`), so a new task is one Python file (in `dgtune/tasks/`, or any importable module
named by the task config's `module` key) plus one YAML in `configs/task/`, and no dispatcher to edit."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

TASKS: dict[str, Callable] = {}  # task.name -> builder(cfg) -> task


def register_task(name: str):
    """Decorator: `builder(cfg)` builds the task of a `configs/task/*.yaml` whose `name` is `name`."""

    def deco(builder: Callable) -> Callable:
        if name in TASKS and TASKS[name] is not builder:
            raise ValueError(f"task name {name!r} is registered twice ({TASKS[name].__module__} and {builder.__module__})")
        TASKS[name] = builder
        return builder

    return deco


def discover() -> None:
    """Import every module of the `dgtune.tasks` package, so that each registers its tasks."""
    package = __name__.rpartition(".")[0]  # dgtune.tasks
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{package}.{info.name}")


def build_task(cfg):
    """The task of a task config (`configs/task/*.yaml`): the builder registered under `cfg.name`, found among
    dgtune's own tasks or in the module named by `cfg.module` (your own task)."""
    from dgtune.errors import ConfigError

    name = cfg.name
    if name not in TASKS:
        module = cfg.get("module")
        if module:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"task.module={module!r} cannot be imported ({e})") from e
        discover()
    if name not in TASKS:
        raise ConfigError(f"unknown task.name={name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name](cfg)
