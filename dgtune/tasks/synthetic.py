"""Synthetic structured tasks (bucket = task name, so reports break results down per task) for pretraining the bundled base (no Sudoku): Latin squares, sorting, addition,
reversal. Latin-square completion shares Sudoku's grid format and row/column rules, without its boxes.
"""

from __future__ import annotations

import random

from dgtune.errors import ConfigError
from dgtune.tasks.base import Mixture, make_row
from dgtune.tasks.registry import register_task

SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _exact_grade(row: dict, output: str) -> dict[str, float]:
    out = output.strip()
    ref = row["response"]
    hits = sum(a == b for a, b in zip(out, ref)) / max(len(ref), 1)
    ok = float(out == ref)
    return {"solved": ok, "exact": ok, "cell_acc": hits, "parse_fail": float(len(out) == 0)}


def random_latin_square(size: int, rng: random.Random) -> list[list[int]]:
    """A random Latin square (cell-by-cell randomised backtracking), symbols 1..size."""
    grid = [[0] * size for _ in range(size)]
    cells = [(r, c) for r in range(size) for c in range(size)]

    def fill(k: int) -> bool:
        if k == len(cells):
            return True
        r, c = cells[k]
        used = set(grid[r][:c]) | {grid[i][c] for i in range(r)}
        options = [v for v in range(1, size + 1) if v not in used]
        rng.shuffle(options)
        for v in options:
            grid[r][c] = v
            if fill(k + 1):
                return True
        grid[r][c] = 0
        return False

    fill(0)
    return grid


def latin_valid(puzzle: str, candidate: str, size: int) -> bool:
    """Rows and columns are permutations of 1..size and the givens are kept."""
    if len(candidate) != size * size or any(ch not in "123456789"[:size] for ch in candidate):
        return False
    if any(p != "0" and p != q for p, q in zip(puzzle, candidate)):
        return False
    rows = [candidate[r * size:(r + 1) * size] for r in range(size)]
    cols = ["".join(row[c] for row in rows) for c in range(size)]
    return all(len(set(line)) == size for line in rows + cols)


class LatinSquareTask:
    """Complete a partially filled Latin square ("latin:" + grid with 0 for blanks). Graded by the rules."""

    def __init__(self, size: int = 9, min_blank: float = 0.3, max_blank: float = 0.7):
        self.size, self.min_blank, self.max_blank = size, min_blank, max_blank
        self.name = f"latin{size}"
        self.canvas_length = size * size + 1

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed + SPLIT_OFFSET[split])
        rows = []
        for _ in range(n):
            sol = "".join(str(v) for line in random_latin_square(self.size, rng) for v in line)
            frac = rng.uniform(self.min_blank, self.max_blank)
            blanks = set(rng.sample(range(len(sol)), int(frac * len(sol))))
            puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(sol))
            rows.append(make_row(self.name, "latin:" + puzzle, sol, self.name, puzzle, sol, len(sol) - len(blanks)))
        return rows

    def grade(self, row: dict, output: str) -> dict[str, float]:
        out = output.strip()
        puzzle, ref = row["puzzle"], row["solution"]
        blanks = [i for i, ch in enumerate(puzzle) if ch == "0"]
        ok = float(latin_valid(puzzle, out[: len(ref)], self.size))
        cell = sum(i < len(out) and out[i] == ref[i] for i in blanks) / max(len(blanks), 1)
        return {"solved": ok, "exact": float(out == ref), "cell_acc": cell, "parse_fail": float(len(out) < len(ref))}


class SortTask:
    """Sort a string of digits ("sort:" + digits)."""

    name = "sort"

    def __init__(self, min_len: int = 4, max_len: int = 40):
        self.min_len, self.max_len = min_len, max_len
        self.canvas_length = max_len + 1

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed + SPLIT_OFFSET[split])
        rows = []
        for _ in range(n):
            s = "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_len, self.max_len)))
            rows.append(make_row(self.name, "sort:" + s, "".join(sorted(s)), self.name))
        return rows

    grade = staticmethod(_exact_grade)


class ReverseTask:
    """Reverse a string of digits ("rev:" + digits)."""

    name = "rev"

    def __init__(self, min_len: int = 4, max_len: int = 60):
        self.min_len, self.max_len = min_len, max_len
        self.canvas_length = max_len + 1

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed + SPLIT_OFFSET[split])
        rows = []
        for _ in range(n):
            s = "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_len, self.max_len)))
            rows.append(make_row(self.name, "rev:" + s, s[::-1], self.name))
        return rows

    grade = staticmethod(_exact_grade)


class AdditionTask:
    """Add two non-negative integers ("add:" + a + "+" + b)."""

    name = "add"

    def __init__(self, max_digits: int = 10):
        self.max_digits = max_digits
        self.canvas_length = max_digits + 2

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed + SPLIT_OFFSET[split])
        rows = []
        for _ in range(n):
            a = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
            b = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
            rows.append(make_row(self.name, f"add:{a}+{b}", str(a + b), self.name))
        return rows

    grade = staticmethod(_exact_grade)


@register_task("pretrain_mix")
def build_pretrain_mix(cfg) -> Mixture:
    """`task=pretrain_mix`: the generated tasks of the base's pretraining mixture, weighted by `task.weights`."""
    makers = {"latin9": lambda: LatinSquareTask(9), "latin4": lambda: LatinSquareTask(4), "sort": SortTask,
              "rev": ReverseTask, "add": AdditionTask}
    unknown = set(cfg.weights) - set(makers)
    if unknown:
        raise ConfigError(f"task.weights has unknown tasks {sorted(unknown)}; known: {sorted(makers)}")
    return Mixture([makers[k]() for k in cfg.weights], list(cfg.weights.values()), cfg.canvas_length, cfg.name)


@register_task("synthetic")
def build_synthetic(cfg):
    """One generated task of the pretraining mixture (`task.kind`: sort or rev), e.g. inside `task=mixture`."""
    makers = {"sort": SortTask, "rev": ReverseTask}
    if cfg.kind not in makers:
        raise ConfigError(f"task.kind={cfg.kind!r}: expected one of {sorted(makers)}")
    return makers[cfg.kind](cfg.get("min_len", 4), cfg.get("max_len", 40))
