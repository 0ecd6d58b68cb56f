"""Sudoku (4x4 and 9x9) as a dgtune task: generated splits, difficulty buckets, external CSV test files."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from dgtune.errors import ConfigError
from dgtune.tasks.base import make_row
from dgtune.tasks.registry import register_task
from dgtune.tasks.structured import StructuredTask, split_counts, split_seed
from dgtune.tasks.sudoku import engine

MARKERS = "abcdefghijklmnopqrstuvwxyz#"  # layout "boxes": one marker per (row, box) segment, 27 for 9x9
LAYOUTS = ("flat", "boxes")


def layout_positions(size: int, layout: str) -> list[int]:
    """Canvas position of each cell (row-major) in a response `layout`: "flat" = the n*n digits; "boxes" = each
    row's box-wide segment preceded by its own marker token (9x9: 'a' + 3 digits, 27 segments, 108 tokens), so
    that every cell reads its row and box from the marker before it (rotary positions alone are relative: a cell
    cannot tell which row it is in)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"task.layout={layout!r}: expected one of {LAYOUTS}")
    if layout == "flat":
        return list(range(size * size))
    _, bw = engine.box_shape(size)
    return [i + i // bw + 1 for i in range(size * size)]


class SudokuTask(StructuredTask):
    """Sudoku of side `size`. Training puzzles have `train_givens` givens; val/test are balanced over
    `test_buckets` (name -> [min, max] givens; 9x9 uses Google's buckets easy >= 40, medium 30-39, hard < 30)."""

    def __init__(self, size: int = 9, train_givens=(30, 45), test_buckets: dict | None = None, canvas_length=None,
                 use_template: bool = False, compact_prompt: bool = False, fresh_per_base: int = 8,
                 layout: str = "flat"):
        if compact_prompt and not use_template:
            raise ConfigError("task.compact_prompt=true needs task.template=true: the givens must be in the canvas "
                             "when the prompt no longer carries the grid")
        if fresh_per_base < 1:
            raise ConfigError(f"task.fresh_per_base={fresh_per_base}: must be >= 1")
        self.size = size
        self.use_template = use_template
        self.compact_prompt = compact_prompt
        self.fresh_per_base = fresh_per_base
        self.layout = layout
        self.cell_positions = layout_positions(size, layout)  # canvas position of each cell
        self.response_length = self.cell_positions[-1] + 1
        self.name = f"sudoku{size}"
        self.train_givens = tuple(train_givens)
        self.test_buckets = dict(test_buckets) if test_buckets else {"all": list(train_givens)}
        self.canvas_length = canvas_length or self.response_length + 1
        if self.canvas_length <= self.response_length:
            raise ConfigError(f"task.canvas_length={self.canvas_length}: the {layout} layout needs at least "
                             f"{self.response_length + 1} (response + EOS)")

    def format_response(self, grid: str) -> str:
        """A grid string (n*n digits, 0 = blank) in the task's layout (markers added for "boxes")."""
        if self.layout == "flat":
            return grid
        _, bw = engine.box_shape(self.size)
        return "".join(MARKERS[k] + grid[k * bw:(k + 1) * bw] for k in range(len(grid) // bw))

    def parse_output(self, text: str) -> str:
        """Model output back to the flat grid text the rule checker reads (markers of the layout dropped)."""
        return text if self.layout == "flat" else "".join(ch for ch in text if ch not in MARKERS)

    def _rows(self, puzzles: list[dict]) -> list[dict]:
        rows = []
        for p in puzzles:
            bucket = engine.bucket(p["givens"], self.size) or ""
            prompt = engine.format_prompt("" if self.compact_prompt else p["puzzle"])
            rows.append(make_row(self.name, prompt, self.format_response(p["solution"]) if p["solution"] else "",
                                 bucket, p["puzzle"], p["solution"], p["givens"]))
        return rows

    def build_split(self, split: str, n: int, seed: int) -> list[dict]:
        """Train: `n` puzzles over `train_givens`; val/test: `n` split evenly over the test buckets. Each givens
        value gets a pool of truly generated puzzles (up to 64 for train, 32 for val/test; fewer for tiny splits),
        multiplied by symmetries."""
        s = split_seed(split, seed)
        if split == "train":
            lo, hi = self.train_givens
            return self._rows(engine.generate_puzzles(self.size, n, lo, hi, seed=s, base_per_givens=min(64, max(2, n // 4))))
        rows = []
        buckets = list(self.test_buckets.items())
        counts = split_counts(n, [name for name, _ in buckets])
        for i, (name, (lo, hi)) in enumerate(buckets):
            k = counts[name]
            rows += self._rows(engine.generate_puzzles(self.size, k, lo, hi, seed=s + 17 * i,
                                                       base_per_givens=min(32, max(2, k // 2))))
        return rows

    def fresh_rows(self, n: int, seed: int) -> list[dict]:
        """`n` new training rows, a pure function of `seed` (so a resumed run sees the same ones): ceil(n /
        fresh_per_base) puzzles generated from scratch (random full grid, cells blanked while the solution stays
        unique, givens drawn uniformly from `train_givens`), each shown under `fresh_per_base` random symmetries.
        At ~5 ms a puzzle on a CPU, this is an endless stream that never repeats a training puzzle."""
        rng = random.Random(seed)
        lo, hi = self.train_givens
        out = []
        while len(out) < n:
            sol = engine.random_solution(self.size, rng)
            puz = engine.make_unique_puzzle(sol, self.size, rng.randint(lo, hi), rng)
            givens = self.size * self.size - puz.count("0")
            for _ in range(min(self.fresh_per_base, n - len(out))):
                p2, s2 = engine.transform(puz, sol, self.size, rng)
                out.append({"puzzle": p2, "solution": s2, "givens": givens})
        return self._rows(out)

    def load_test_file(self, path: str) -> list[dict]:
        """Rows from a CSV with header `puzzle,solution` (see `engine.read_csv`)."""
        return self._rows(engine.read_csv(path, self.size))

    def row_from_prompt(self, prompt: str) -> dict:
        """The row for a user prompt `sudoku:<grid>` (blanks `0` or `.`), graded by the rules; a malformed grid
        raises SudokuFormatError saying what is wrong."""
        prefix = engine.format_prompt("")
        if not prompt.startswith(prefix):
            raise engine.SudokuFormatError(f"prompt {prompt[:20]!r}... must start with {prefix!r}, then the "
                                           f"{self.size * self.size} cells of the grid")
        puzzle = prompt[len(prefix):].strip().replace(".", "0")
        cells = engine._to_ints(puzzle, self.size)  # length and characters
        if not engine._units_ok(puzzle, self.size, True):
            raise engine.SudokuFormatError(f"puzzle {puzzle!r}: its givens contradict each other (a row, column or "
                                           "box repeats a digit)")
        return self._rows([{"puzzle": puzzle, "solution": "", "givens": sum(1 for v in cells if v)}])[0]

    def canvas_template(self, row: dict) -> list[str | None]:
        """The givens (and a layout's markers) in their canvas positions (known, never corrupted, clamped when
        sampling); None = blank."""
        return [ch if ch != "0" else None for ch in self.format_response(row["puzzle"])]

    def peers(self) -> torch.Tensor:
        """[n, n] bool: cells sharing a row, column or box (a cell is not its own peer)."""
        u = self.units()
        return (u.T @ u > 0) & ~torch.eye(u.shape[1], dtype=torch.bool)

    def units(self) -> torch.Tensor:
        """[3n, n*n] float: membership of each cell in each row, column and box (built once per task)."""
        if getattr(self, "_units", None) is None:
            n, (bh, bw) = self.size, engine.box_shape(self.size)
            r, c = torch.arange(n * n) // n, torch.arange(n * n) % n
            box = (r // bh) * (n // bw) + c // bw
            self._units = torch.cat([F.one_hot(r, n).T, F.one_hot(c, n).T, F.one_hot(box, n).T]).float()
        return self._units

    def aux_token_ids(self, tokenizer) -> list[int]:
        """The digit tokens '1'..'n': the canvas distribution the unit-constraint loss reads."""
        return [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, self.size + 1)]

    def aux_loss(self, digit_probs: torch.Tensor, clean: torch.Tensor, keep: torch.Tensor | None,
                 digit_ids: torch.Tensor) -> torch.Tensor:
        """Sudoku's unit constraint as a soft penalty: for every row, column and box and every digit, the predicted
        probabilities of that digit over the unit's cells should sum to one (each digit exactly once).

        digit_probs [b, l, n]: the model's distribution over the digit tokens (renormalised over them); clean [b, l]
        the clean canvas; keep [b, l] the template (given) positions, whose digit is known (one-hot, not the
        model's); digit_ids [n] the digit token ids. Returns the mean squared deviation over units and digits."""
        pos = torch.tensor(self.cell_positions, device=digit_probs.device)  # [c]
        p = digit_probs[:, pos].float()  # [b, c, n]
        if keep is not None:
            given = (clean[:, pos, None] == digit_ids.to(clean.device)).float()  # [b, c, n]
            p = torch.where(keep[:, pos, None], given, p)
        sums = torch.einsum("uc,bcd->bud", self.units().to(p.device), p)  # [b, 3n, n]
        return ((sums - 1.0) ** 2).mean()

    def make_guide(self, tokenizer, rows: list[dict]):
        """A rule checker for verifier-guided sampling (`dgtune.sampling.guide`): flags fixed cells whose digit
        repeats the digit of another fixed cell in its row, column or box (the same rules for every row)."""
        from dgtune.sampling.guide import digit_values, not_equal_guide

        pos = torch.tensor(self.cell_positions)  # [c] canvas positions of the cells
        conflict = torch.zeros(self.canvas_length, self.canvas_length, dtype=torch.bool)  # [l, l]
        conflict[pos[:, None], pos[None, :]] = self.peers()
        return not_equal_guide(conflict, digit_values(tokenizer, range(1, self.size + 1)))

    def grade(self, row: dict, output: str) -> dict[str, float]:
        """Rules first (`solved`), then the reference (`exact`, `cell_acc`)."""
        return engine.grade(row["puzzle"], row["solution"] or None, self.parse_output(output), self.size)


@register_task("sudoku")
def build_sudoku(cfg) -> SudokuTask:
    """`task=sudoku4` / `task=sudoku9`: size, training givens, test buckets, canvas template and layout."""
    buckets = {k: list(v) for k, v in (cfg.get("test_buckets") or {}).items()}
    return SudokuTask(cfg.size, tuple(cfg.train_givens), buckets or None, cfg.get("canvas_length"),
                      bool(cfg.get("template", False)), bool(cfg.get("compact_prompt", False)),
                      int(cfg.get("fresh_per_base", 8)), cfg.get("layout", "flat"))
