"""Structured tasks: each builds prompt/response rows and grades a model's output with a rule-based verifier.

Each task module registers its builder by name (`dgtune.tasks.registry`); `build_task(cfg)` builds the task a
`configs/task/*.yaml` names."""

from dgtune.tasks.registry import TASKS, build_task, register_task  # noqa: F401
