"""Bring your own task: JSONL files of {"prompt": ..., "response": ...} plus an optional verifier.

The verifier is an importable `module:function` taking `(row: dict, output: str)` and returning a bool (solved)
or a dict with any of `solved`, `exact`, `cell_acc`, `parse_fail`. Without one, outputs are graded by exact match.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from dgtune.tasks.base import make_row


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
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("response", ""), str):
            raise ValueError(f"{path}:{lineno}: expected an object with string fields 'prompt' and 'response'")
        rows.append(make_row(name, obj["prompt"], obj.get("response", ""), str(obj.get("bucket", ""))))
    return rows


def load_verifier(spec: str | None):
    """Import `module:function`, or None."""
    if not spec:
        return None
    module, _, func = spec.partition(":")
    if not func:
        raise ValueError(f"verifier {spec!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"task.verifier={spec!r}: cannot import module {module!r} ({e})") from None
    if not callable(getattr(mod, func, None)):
        raise ValueError(f"task.verifier={spec!r}: module {module!r} has no function {func!r}")
    return getattr(mod, func)


class JsonlTask:
    """A user task from JSONL files (train/val/test) and a verifier."""

    def __init__(self, name: str, files: dict, canvas_length: int, verifier: str | None = None):
        self.name, self.files, self.canvas_length = name, dict(files), canvas_length
        self.verifier = load_verifier(verifier)

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """The first `n` rows of the split's file (all rows when n <= 0); val falls back to the head of train."""
        path = self.files.get(split) or (self.files.get("train") if split == "val" else None)
        if not path:
            raise ValueError(f"task {self.name}: no file for split {split!r} (set task.files.{split})")
        rows = read_jsonl(path, self.name)
        return rows[:n] if n and n > 0 else rows

    def load_test_file(self, path: str) -> list[dict]:
        """Rows of another JSONL file."""
        return read_jsonl(path, self.name)

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """The verifier's verdict, or exact match."""
        out = output.strip()
        exact = float(out == row["response"].strip())
        if self.verifier is None:
            return {"solved": exact, "exact": exact, "cell_acc": exact, "parse_fail": float(not out)}
        verdict = self.verifier(row, out)
        if isinstance(verdict, dict):
            solved = float(verdict.get("solved", exact))
            return {"solved": solved, "exact": float(verdict.get("exact", exact)),
                    "cell_acc": float(verdict.get("cell_acc", solved)), "parse_fail": float(verdict.get("parse_fail", 0.0))}
        return {"solved": float(bool(verdict)), "exact": exact, "cell_acc": float(bool(verdict)), "parse_fail": float(not out)}
