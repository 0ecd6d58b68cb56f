"""The one small Task interface, and a mixture of tasks.

A task produces rows (plain dicts) with at least `task`, `prompt` (user message), `response` (reference answer)
and `bucket` ("" when the task has no difficulty buckets), and grades an output text against a row:
`{"solved", "exact", "cell_acc", "parse_fail"}` as floats in [0, 1].
"""

from __future__ import annotations

import importlib
import random
from typing import Protocol

from dgtune.errors import ConfigError, InputError, VerifierError
from dgtune.tasks.registry import build_task, register_task

ROW_KEYS = ("task", "prompt", "response", "bucket", "puzzle", "solution", "givens", "context", "source")


def make_row(task: str, prompt: str, response: str, bucket: str = "", puzzle: str = "", solution: str = "", givens: int = 0,
             context: str = "", source: str = ""):
    """A row with every key of the shared schema (so rows of different tasks fit one `datasets` table).
    `context`: chat data's messages before the answer as a JSON list ("" = `prompt` is the one user message);
    `source`: where the row came from (file and row), for error messages."""
    return {"task": task, "prompt": prompt, "response": response, "bucket": bucket or "", "puzzle": puzzle,
            "solution": solution, "givens": int(givens), "context": context or "", "source": source or ""}


GRADE_KEYS = ("solved", "exact", "cell_acc", "parse_fail")  # what `Task.grade` returns, each in [0, 1]


def grade_value(value, what: str) -> float:
    """A verifier's grade as a float in [0, 1] (bools count as 0 / 1), or VerifierError naming `what`."""
    import math

    if isinstance(value, bool):
        return float(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise VerifierError(f"{what} = {value!r} is not a number in [0, 1]") from None
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise VerifierError(f"{what} = {value!r} is not a number in [0, 1]")
    return x


def load_verifier(spec: str | None):
    """Import `module:function`, or None."""
    if not spec:
        return None
    module, _, func = spec.partition(":")
    if not func:
        raise InputError(f"verifier {spec!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"task.verifier={spec!r}: cannot import module {module!r} ({e})") from None
    if not callable(getattr(mod, func, None)):
        raise InputError(f"task.verifier={spec!r}: module {module!r} has no function {func!r}")
    return getattr(mod, func)


def call_verifier(verifier, row: dict, output: str) -> float | dict[str, float]:
    """`verifier(row, output)`, checked: its exception, a key other than solved / exact / cell_acc / parse_fail, or
    a value that is not a finite number in [0, 1] raises VerifierError naming the verifier and the row."""
    name = f"{getattr(verifier, '__module__', '?')}:{getattr(verifier, '__qualname__', verifier)}"
    where = row.get("source") or f"the row with prompt {row.get('prompt', '')[:60]!r}"
    try:
        verdict = verifier(row, output)
    except Exception as e:  # the user's code: name it and the row, keep the cause chained
        raise VerifierError(f"verifier {name} raised {type(e).__name__}: {e} (on {where})") from e
    if isinstance(verdict, dict):
        unknown = sorted(set(verdict) - set(GRADE_KEYS))
        if unknown:
            raise VerifierError(f"verifier {name} returned keys {unknown} on {where}; expected any of {list(GRADE_KEYS)}")
        return {k: grade_value(v, f"verifier {name} on {where}: {k}") for k, v in verdict.items()}
    return grade_value(verdict, f"verifier {name} on {where}: its verdict")


class Task(Protocol):
    """What dgtune needs from a task."""

    name: str
    canvas_length: int  # response tokens + EOS fill the model denoises at once

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """`n` rows for `split` ("train", "val", "test"), reproducible for `seed`."""

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """Score one output text against its row."""


class Mixture:
    """Rows drawn from several tasks with fixed weights; grading dispatches on `row["task"]`."""

    def __init__(self, tasks: list, weights: list[float], canvas_length: int, name: str = "mixture"):
        if len(tasks) != len(weights) or not tasks:
            raise ConfigError("mixture needs one weight per task")
        self.tasks = {t.name: t for t in tasks}
        self.weights = dict(zip(self.tasks, weights))
        self.canvas_length = canvas_length
        self.name = name

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """Split `n` rows among the tasks by weight (largest remainder) and shuffle them together."""
        total = sum(self.weights.values())
        counts = {k: int(n * w / total) for k, w in self.weights.items()}
        for k in sorted(self.weights, key=lambda k: -(n * self.weights[k] / total - counts[k]))[: n - sum(counts.values())]:
            counts[k] += 1
        rows = []
        for i, (name, task) in enumerate(self.tasks.items()):
            rows += task.build_split(split, counts[name], seed * 101 + i)
        random.Random(seed).shuffle(rows)
        return rows

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """Grade with the row's own task."""
        return self.tasks[row["task"]].grade(row, output)


@register_task("mixture")
def build_mixture(cfg):
    """`task=mixture`: one adapter on several tasks (`task.tasks.<key>`: any task config; `task.weights.<key>`: its
    share of the rows), all on one canvas of `task.canvas_length` tokens, answers up to `task.max_canvases`
    canvases; reports break results down per task (`dgtune.eval.report`)."""
    from omegaconf import OmegaConf

    subs = cfg.get("tasks") or {}
    if not subs:
        raise ConfigError("task=mixture needs task.tasks.<key>: a task config per task (see configs/task/mixture.yaml)")
    weights = dict(cfg.get("weights") or {})
    unknown = set(weights) - set(subs)
    if unknown:
        raise ConfigError(f"task.weights names tasks {sorted(unknown)} that task.tasks lacks ({sorted(subs)})")
    tasks = []
    for key, sub in subs.items():
        sub = OmegaConf.merge(OmegaConf.to_container(sub, resolve=True), {"canvas_length": cfg.canvas_length})  # one canvas for all
        tasks.append(build_task(sub))
        if getattr(tasks[-1], "use_template", False):
            raise ConfigError(f"task.tasks.{key}: canvas templates are not supported inside a mixture")
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"task=mixture: two tasks share a name ({names}); give each a task_name")
    mix = Mixture(tasks, [float(weights.get(k, 1.0)) for k in subs], cfg.canvas_length, cfg.get("task_name", "mixture"))
    mix.max_canvases = max([int(cfg.get("max_canvases", 1))] + [getattr(t, "max_canvases", 1) for t in tasks])
    return mix
