"""Sudoku (4x4 and 9x9) as a dgtune task: generated splits, difficulty buckets, external CSV test files."""

from __future__ import annotations

from dgtune.tasks import sudoku
from dgtune.tasks.base import make_row

SPLIT_SEED = {"train": 0, "val": 7_919, "test": 15_485_863}


class SudokuTask:
    """Sudoku of side `size`. Training puzzles have `train_givens` givens; val/test are balanced over
    `test_buckets` (name -> [min, max] givens; 9x9 uses Google's buckets easy >= 40, medium 30-39, hard < 30)."""

    def __init__(self, size: int = 9, train_givens=(30, 45), test_buckets: dict | None = None, canvas_length=None,
                 use_template: bool = False):
        self.size = size
        self.use_template = use_template
        self.name = f"sudoku{size}"
        self.train_givens = tuple(train_givens)
        self.test_buckets = dict(test_buckets) if test_buckets else {"all": list(train_givens)}
        self.canvas_length = canvas_length or size * size + 1

    def _rows(self, puzzles: list[dict]) -> list[dict]:
        rows = []
        for p in puzzles:
            bucket = sudoku.bucket(p["givens"], self.size) or ""
            rows.append(make_row(self.name, sudoku.format_prompt(p["puzzle"]), sudoku.format_response(p["solution"]) if p["solution"] else "",
                                 bucket, p["puzzle"], p["solution"], p["givens"]))
        return rows

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """Train: `n` puzzles over `train_givens`; val/test: `n` split evenly over the test buckets."""
        s = seed * 1_000_003 + SPLIT_SEED[split]
        if split == "train":
            lo, hi = self.train_givens
            return self._rows(sudoku.generate_puzzles(self.size, n, lo, hi, seed=s, base_per_givens=64))
        rows = []
        buckets = list(self.test_buckets.items())
        for i, (_, (lo, hi)) in enumerate(buckets):
            k = n // len(buckets) + (1 if i < n % len(buckets) else 0)
            rows += self._rows(sudoku.generate_puzzles(self.size, k, lo, hi, seed=s + 17 * i, base_per_givens=32))
        return rows

    def load_test_file(self, path: str) -> list[dict]:
        """Rows from a CSV with header `puzzle,solution` (see `sudoku.read_csv`)."""
        return self._rows(sudoku.read_csv(path, self.size))

    def canvas_template(self, row: dict) -> list[str | None]:
        """The givens in their canvas positions (known, never corrupted, clamped when sampling); None = blank."""
        return [ch if ch != "0" else None for ch in row["puzzle"]]

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """Rules first (`solved`), then the reference (`exact`, `cell_acc`)."""
        return sudoku.grade(row["puzzle"], row["solution"] or None, output, self.size)
