"""Shared pieces of the structured task families (countdown, schema record, graph colouring).

Each family is a class with a generator (`build_split`), a rule verifier (`grade`), named difficulty levels (one
small dataclass per family; the level name is the row's bucket) and, where the answer's structure is fixed, a
canvas template (`canvas_template`, one token per known piece).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dgtune.errors import ConfigError, InputError
from dgtune.tasks.base import make_row

SPLIT_SEED = {"train": 0, "val": 7_919, "test": 15_485_863}


def split_seed(split: str, seed: int) -> int:
    """The generator seed of `split` for a run seed (train, val and test never share a stream)."""
    if split not in SPLIT_SEED:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEED)}")
    return seed * 1_000_003 + SPLIT_SEED[split]


def split_counts(n: int, names: list[str]) -> dict[str, int]:
    """`n` rows spread evenly over `names` (the first ones take the remainder)."""
    return {name: n // len(names) + (1 if i < n % len(names) else 0) for i, name in enumerate(names)}


class StructuredTask:
    """What the structured families share: `template_tensor` (for tasks with `canvas_template(row)` and
    `use_template`) and `load_test_file` (one prompt per line, each read by the family's `row_from_prompt`)."""

    use_template = False

    def template_tensor(self, tokenizer, rows: list[dict]) -> torch.Tensor:
        """Templates of `rows` as token ids [b, canvas_length] (-1 = free)."""
        from dgtune.data import template_ids

        return torch.tensor([template_ids(tokenizer, self.canvas_template(r), self.canvas_length) for r in rows])

    def load_test_file(self, path: str) -> list[dict]:
        """Rows of a text file with one prompt per line (blank lines skipped), graded by the rules; a malformed
        line stops with the file, line number and reason."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"test file {p} does not exist")
        rows = []
        for lineno, line in enumerate(p.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(self.row_from_prompt(line.strip()))
                except ValueError as e:
                    raise InputError(f"{p}:{lineno}: {e}") from None
        return rows


def levels_from(spec: dict | None, level_cls, default: dict) -> dict:
    """Name -> level dataclass from a config mapping (name -> dict of fields), or the family's defaults."""
    spec = dict(spec) if spec else default
    out = {}
    for name, fields in spec.items():
        if isinstance(fields, level_cls):
            out[name] = fields
            continue
        try:
            out[name] = level_cls(**dict(fields))
        except TypeError as e:
            raise ConfigError(f"level {name!r}: {e} (fields of {level_cls.__name__}: "
                             f"{list(level_cls.__dataclass_fields__)})") from None
    if not out:
        raise ConfigError(f"no {level_cls.__name__} levels given")
    return out


__all__ = ["StructuredTask", "levels_from", "make_row", "split_counts", "split_seed", "structured_args"]


def structured_args(cfg) -> tuple[dict | None, int | None, bool]:
    """(levels, canvas_length, template) of a structured task's config (`task.levels`, ...)."""
    levels = {k: dict(v) for k, v in (cfg.get("levels") or {}).items()} or None
    return levels, cfg.get("canvas_length"), bool(cfg.get("template", False))
