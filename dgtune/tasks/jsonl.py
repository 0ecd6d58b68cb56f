"""Bring your own task: JSONL files of {"prompt": ..., "response": ...} plus an optional verifier.

The verifier is an importable `module:function` taking `(row: dict, output: str)` and returning a bool (solved)
or a dict with any of `solved`, `exact`, `cell_acc`, `parse_fail`. Without one, outputs are graded by exact match.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from dgtune.errors import InputError, VerifierError
from dgtune.tasks.base import GRADE_KEYS, grade_value, make_row
from dgtune.tasks.registry import register_task


def read_jsonl(path: str | Path, name: str) -> list[dict]:
    """Rows from a JSONL file; a malformed line stops with the file, line number and reason."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("response", ""), str):
            raise InputError(f"{path}:{lineno}: expected an object with string fields 'prompt' and 'response'")
        rows.append(make_row(name, obj["prompt"], obj.get("response", ""), str(obj.get("bucket", ""))))
    return rows


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


class JsonlTask:
    """A user task from JSONL files (train/val/test) and a verifier."""

    def __init__(self, name: str, files: dict, canvas_length: int, verifier: str | None = None):
        self.name, self.files, self.canvas_length = name, dict(files), canvas_length
        self.verifier = load_verifier(verifier)

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """The first `n` rows of the split's file (all rows when n <= 0); val falls back to the head of train."""
        path = self.files.get(split) or (self.files.get("train") if split == "val" else None)
        if not path:
            raise InputError(f"task {self.name}: no file for split {split!r} (set task.files.{split})")
        rows = read_jsonl(path, self.name)
        return rows[:n] if n and n > 0 else rows

    def load_test_file(self, path: str) -> list[dict]:
        """Rows of another JSONL file."""
        return read_jsonl(path, self.name)

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """The verifier's verdict (`call_verifier`), or exact match."""
        out = output.strip()
        exact = float(out == row["response"].strip())
        if self.verifier is None:
            return {"solved": exact, "exact": exact, "cell_acc": exact, "parse_fail": float(not out)}
        verdict = call_verifier(self.verifier, row, out)
        if isinstance(verdict, dict):
            solved = verdict.get("solved", exact)
            return {"solved": solved, "exact": verdict.get("exact", exact), "cell_acc": verdict.get("cell_acc", solved),
                    "parse_fail": verdict.get("parse_fail", 0.0)}
        return {"solved": verdict, "exact": exact, "cell_acc": verdict, "parse_fail": float(not out)}


@register_task("jsonl")
def build_jsonl(cfg) -> JsonlTask:
    """`task=jsonl`: your JSONL files (`task.files.*`) and verifier (`task.verifier`)."""
    return JsonlTask(cfg.get("task_name", "jsonl"), dict(cfg.files), cfg.canvas_length, cfg.get("verifier"))
