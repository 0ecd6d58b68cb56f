"""Bring your own data: any local file that `datasets` loads (JSON / JSONL, Parquet, CSV) as a dgtune task.

Two row formats (`configs/task/data.yaml`):

- **columns**: `task.columns.prompt` and `task.columns.response` name the prompt and answer columns (renamed
  columns of your own, e.g. `task.columns.prompt=question task.columns.response=answer`); the prompt is sent as
  one user turn through the tokenizer's chat template.
- **chat**: `task.columns.messages` names a column of chat messages (`[{"role": "system" | "user" |
  "assistant", "content": ...}, ...]`, a list or its JSON text); the last message must be the assistant's answer
  and is the only thing the diffusion loss covers (the canvas); every earlier turn (system, user, earlier assistant
  turns) is context, formatted by the tokenizer's chat template into the prompt.

Optional: `task.columns.bucket` (a column whose values become report buckets); a verifier `task.verifier=
package.module:function` (`(row, output) -> bool | dict`, see `dgtune.tasks.base.call_verifier`; default exact match); a canvas
template string `task.template`, one character per canvas position: `task.template_free` (default `_`) marks a
position the model fills, any other character is fixed there (never corrupted in training, clamped when sampling);
each fixed character must be one token, and every answer must agree with the template (checked when encoding).
Answers may span `task.max_canvases` canvases of `task.canvas_length` tokens (a longer one is an error naming its
file and row); a template covers the first canvas.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dgtune.errors import ConfigError, InputError
from dgtune.tasks.base import call_verifier, load_verifier, make_row
from dgtune.tasks.registry import register_task

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


def load_table(path: str | Path, fmt: str | None = None) -> list[dict]:
    """The rows of a local JSON / JSONL / CSV / Parquet file, read by `datasets` (format from the extension unless
    `fmt` says), as plain dicts. A missing file, an unknown format, an unreadable or empty file is an error naming it."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    builder = fmt or FORMATS.get(path.suffix.lower())
    if builder not in set(FORMATS.values()):
        raise InputError(f"task file {path}: unknown format {builder or path.suffix!r} (set task.format to one of "
                         f"{sorted(set(FORMATS.values()))})")
    if path.stat().st_size == 0:
        raise InputError(f"task file {path} is empty")
    datasets.disable_progress_bars()
    library_log = logging.getLogger("datasets")  # it logs a corrupt file's traceback before raising: ours names it
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train")
    except Exception as e:  # datasets' parse errors: one line naming the file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "corresponds to no data" in msg:  # e.g. a CSV with a header and no rows
            raise InputError(f"task file {path} has no rows") from None
        bad = _bad_json_line(path) if builder == "json" else None
        if bad:
            raise InputError(bad) from None
        raise InputError(f"task file {path}: datasets could not read it as {builder} ({msg})") from None
    finally:
        library_log.setLevel(level)
    if len(ds) == 0:
        raise InputError(f"task file {path} has no rows")
    return ds.to_list()


def _bad_json_line(path: Path) -> str | None:
    """For a JSON-lines file that `datasets` could not read: `file:line: reason` of its first line that is not a JSON
    object, or None (a JSON array file, or no bad line found)."""
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("["):
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{lineno}: not valid JSON ({e.msg})"
        if not isinstance(obj, dict):
            return f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
    return None


def _text(value, path, i: int, column: str, key: str) -> str:
    if value is None:
        raise InputError(f"{path}: row {i}: column {column!r} ({key}) is empty")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InputError(f"{path}: row {i}: column {column!r} ({key}) is a {type(value).__name__}, expected text")
    return value


def split_chat(messages, path, i: int, column: str) -> tuple[list[dict], str]:
    """(context messages, answer) of one chat row: the answer is the last message, which must be the assistant's;
    the context is every earlier message and holds at least one user turn."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: row {i}: column {column!r} is not a JSON list of messages ({e.msg})") from None
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{path}: row {i}: column {column!r} must be a non-empty list of messages")
    clean = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{path}: row {i}: message {j} of column {column!r} must be "
                             f"{{'role': one of {list(ROLES)}, 'content': text}}, got {str(m)[:80]}")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        raise InputError(f"{path}: row {i}: the last message must be the assistant's answer, got role "
                         f"{clean[-1]['role']!r}")
    if not any(m["role"] == "user" for m in clean[:-1]):
        raise InputError(f"{path}: row {i}: no user message before the assistant's answer")
    return clean[:-1], clean[-1]["content"]


class DataTask:
    """A user task from local data files (train / val / test), a column mapping or chat messages, and a verifier."""

    def __init__(self, name: str, files: dict, canvas_length: int, columns: dict | None = None,
                 verifier: str | None = None, fmt: str | None = None, template: str | None = None,
                 template_free: str = "_", max_canvases: int = 1):
        self.name, self.files, self.canvas_length, self.fmt = name, dict(files), canvas_length, fmt
        self.columns = {"prompt": "prompt", "response": "response", "messages": None, "bucket": None,
                        **{k: v for k, v in (columns or {}).items()}}
        unknown = set(self.columns) - {"prompt", "response", "messages", "bucket"}
        if unknown:
            raise ConfigError(f"task.columns has unknown keys {sorted(unknown)} (expected prompt, response, messages, "
                             "bucket)")
        self.verifier = load_verifier(verifier)
        self.max_canvases = int(max_canvases)
        if self.max_canvases < 1:
            raise ConfigError(f"task.max_canvases={max_canvases}: must be >= 1")
        self.template, self.template_free = template or None, template_free
        self.use_template = self.template is not None
        if self.template is not None and len(self.template) > canvas_length:
            raise ConfigError(f"task.template has {len(self.template)} positions, more than task.canvas_length="
                             f"{canvas_length} (a template covers the first canvas)")

    def read(self, path: str | Path) -> list[dict]:
        """The task rows of one file, validated: a missing column names the file, the column and the columns there."""
        path = Path(path)
        table = load_table(path, self.fmt)
        chat = self.columns.get("messages")
        needed = {"messages": chat} if chat else {"prompt": self.columns["prompt"], "response": self.columns["response"]}
        if self.columns.get("bucket"):
            needed["bucket"] = self.columns["bucket"]
        have = list(table[0])
        for key, col in needed.items():
            if col not in have:
                raise InputError(f"task file {path} has no column {col!r} (task.columns.{key}); its columns: {have}")
        rows = []
        for i, rec in enumerate(table, start=1):
            bucket = "" if "bucket" not in needed else str(rec[needed["bucket"]] if rec[needed["bucket"]] is not None else "")
            source = f"{path} row {i}"
            if chat:
                context, answer = split_chat(rec[chat], path, i, chat)
                prompt = next(m["content"] for m in reversed(context) if m["role"] == "user")
                rows.append(make_row(self.name, prompt, answer, bucket, context=json.dumps(context), source=source))
            else:
                prompt = _text(rec[needed["prompt"]], path, i, needed["prompt"], "task.columns.prompt")
                answer = _text(rec[needed["response"]], path, i, needed["response"], "task.columns.response")
                rows.append(make_row(self.name, prompt, answer, bucket, source=source))
        return rows

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """The first `n` rows of the split's file (all rows when n <= 0); val falls back to the head of train; no
        test file is no test rows (eval then asks for one)."""
        path = self.files.get(split) or (self.files.get("train") if split == "val" else None)
        if not path and split == "test":
            return []
        if not path:
            raise InputError(f"task {self.name}: no file for split {split!r} (set task.files.{split})")
        rows = self.read(path)
        return rows[:n] if n and n > 0 else rows

    def load_test_file(self, path: str) -> list[dict]:
        """Rows of another file of the same format."""
        return self.read(path)

    def canvas_template(self, row: dict) -> list[str | None]:
        """The template string per canvas position: its fixed character, or None where the model fills in."""
        return [None if ch == self.template_free else ch for ch in self.template or ""]

    def template_tensor(self, tokenizer, rows: list[dict]):
        """Templates of `rows` as token ids [b, canvas_length] (-1 = free)."""
        import torch

        from dgtune.data import template_ids

        ids = template_ids(tokenizer, self.canvas_template(rows[0] if rows else {}), self.canvas_length)
        return torch.tensor([ids] * len(rows), dtype=torch.long).view(len(rows), self.canvas_length)

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


@register_task("data")
def build_data(cfg) -> DataTask:
    """`task=data`: your JSON/JSONL/CSV/Parquet files, renamed columns or chat `messages`, and verifier."""
    return DataTask(cfg.get("task_name", "data"), dict(cfg.files), cfg.canvas_length, dict(cfg.get("columns") or {}),
                    cfg.get("verifier"), cfg.get("format"), cfg.get("template"), cfg.get("template_free", "_"),
                    cfg.get("max_canvases", 1))
