"""Sudoku (4x4 and 9x9): fast bitmask solver, seeded unique-puzzle generation, grading and CSV I/O.

Grids are row-major strings of length size*size: digits '1'..str(size), blanks '0' ('.' accepted on input).
Pure Python + stdlib.
"""

from __future__ import annotations

import os
import random
import sys

from dgtune.errors import SudokuFormatError  # raised here; defined with dgtune's other errors

__all__ = [
    "SudokuFormatError", "box_shape", "count_solutions", "solve", "random_solution", "make_unique_puzzle",
    "transform", "generate_puzzles", "bucket", "check_grid", "parse_grid", "grade", "read_csv",
    "format_prompt", "format_response",
]


def box_shape(size: int) -> tuple[int, int]:
    """(box rows, box cols): (2, 2) for size 4, (3, 3) for size 9."""
    if size == 4:
        return (2, 2)
    if size == 9:
        return (3, 3)
    raise ValueError(f"unsupported sudoku size {size!r} (expected 4 or 9)")


_GEOM: dict[int, tuple] = {}


def _geom(size: int) -> tuple:
    """Cached tables: (row of cell, col of cell, box of cell, units, popcount, bit -> digit, full mask)."""
    if size not in _GEOM:
        br, bc = box_shape(size)
        n = size * size
        rows = [i // size for i in range(n)]
        cols = [i % size for i in range(n)]
        boxes = [(r // br) * (size // bc) + c // bc for r, c in zip(rows, cols)]
        units = [[i for i in range(n) if key[i] == u] for key in (rows, cols, boxes) for u in range(size)]
        pop = [bin(m).count("1") for m in range(1 << size)]
        bitval = {1 << d: d + 1 for d in range(size)}
        _GEOM[size] = (rows, cols, boxes, units, pop, bitval, (1 << size) - 1)
    return _GEOM[size]


def _to_ints(puzzle: str, size: int) -> list[int]:
    if len(puzzle) != size * size:
        raise SudokuFormatError(f"grid has length {len(puzzle)}, expected {size * size}")
    try:
        out = [0 if ch == "." else int(ch) for ch in puzzle]
    except ValueError:
        raise SudokuFormatError(f"grid {puzzle!r} has a non-digit character") from None
    if any(v > size for v in out):
        raise SudokuFormatError(f"grid {puzzle!r} has a digit above {size}")
    return out


def _search(grid: list[int], size: int, limit: int, rng: random.Random | None = None) -> tuple[int, list[int] | None]:
    """Backtracking with bitmasks and MRV. Returns (number of solutions found, capped at limit; first one)."""
    R, C, B, _, POP, BITVAL, full = _geom(size)
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    empties = []
    for i, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            r, c, b = R[i], C[i], B[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0, None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            empties.append(i)
    grid = list(grid)
    ne = len(empties)
    found = [0, None]

    def rec(k: int) -> bool:
        if k == ne:
            found[0] += 1
            if found[1] is None:
                found[1] = list(grid)
            return found[0] >= limit
        best, bestn, bestm = k, 99, 0
        for j in range(k, ne):
            i = empties[j]
            m = full & ~(rows[R[i]] | cols[C[i]] | boxes[B[i]])
            cnt = POP[m]
            if cnt < bestn:
                best, bestn, bestm = j, cnt, m
                if cnt <= 1:
                    break
        if bestn == 0:
            return False
        empties[k], empties[best] = empties[best], empties[k]
        i = empties[k]
        r, c, b = R[i], C[i], B[i]
        bits = []
        while bestm:
            bit = bestm & -bestm
            bits.append(bit)
            bestm ^= bit
        if rng is not None:
            rng.shuffle(bits)
        for bit in bits:
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = BITVAL[bit]
            stop = rec(k + 1)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if stop:
                grid[i] = 0
                return True
        grid[i] = 0
        return False

    rec(0)
    return found[0], found[1]


def count_solutions(puzzle: str, size: int, limit: int = 2) -> int:
    """Number of solutions of `puzzle`, counting stops at `limit` (0 if the givens contradict)."""
    return _search(_to_ints(puzzle, size), size, limit)[0]


def solve(puzzle: str, size: int) -> str | None:
    """One solution of `puzzle` as a string, or None if it has none."""
    sol = _search(_to_ints(puzzle, size), size, 1)[1]
    return None if sol is None else "".join(map(str, sol))


def random_solution(size: int, rng: random.Random) -> str:
    """A random full valid grid (randomised MRV backtracking fill of the empty grid)."""
    sol = _search([0] * (size * size), size, 1, rng)[1]
    return "".join(map(str, sol))


def _unique_without(grid: list[int], i: int, size: int) -> bool:
    """Whether `grid` (uniquely solvable) stays unique when cell i is blanked: no other digit there works."""
    R, C, B, units, _, _, full = _geom(size)
    v = grid[i]
    seen = 0
    for u in (units[R[i]], units[size + C[i]], units[2 * size + B[i]]):
        for j in u:
            if j != i and grid[j]:
                seen |= 1 << (grid[j] - 1)
    others = full & ~seen & ~(1 << (v - 1))
    for d in range(size):
        if others >> d & 1:
            grid[i] = d + 1
            hit = _search(grid, size, 1)[0]
            if hit:
                grid[i] = v
                return False
    grid[i] = v
    return True


def make_unique_puzzle(solution: str, size: int, target_givens: int, rng: random.Random) -> str:
    """Blank cells of `solution` in random order while the puzzle stays unique, until `target_givens` givens
    remain or no cell can be removed (then more givens than the target remain)."""
    grid = _to_ints(solution, size)
    order = list(range(size * size))
    rng.shuffle(order)
    givens = size * size
    for i in order:
        if givens <= target_givens:
            break
        if _unique_without(grid, i, size):
            grid[i] = 0
            givens -= 1
    return "".join(map(str, grid))


def transform(puzzle: str, solution: str, size: int, rng: random.Random) -> tuple[str, str]:
    """Apply one random symmetry (digit relabelling, band/row/stack/column permutations, optional transpose)
    to both `puzzle` and `solution`; validity, uniqueness and the number of givens are preserved."""
    br, bc = box_shape(size)
    bands = list(range(size // br))
    rng.shuffle(bands)
    rowmap = []
    for band in bands:
        within = list(range(br))
        rng.shuffle(within)
        rowmap += [band * br + w for w in within]
    stacks = list(range(size // bc))
    rng.shuffle(stacks)
    colmap = []
    for stack in stacks:
        within = list(range(bc))
        rng.shuffle(within)
        colmap += [stack * bc + w for w in within]
    digits = [str(d) for d in range(1, size + 1)]
    rng.shuffle(digits)
    relabel = {"0": "0", ".": "0", **{str(d + 1): digits[d] for d in range(size)}}
    idx = [rowmap[r] * size + colmap[c] for r in range(size) for c in range(size)]
    if br == bc and rng.random() < 0.5:
        idx = [idx[c * size + r] for r in range(size) for c in range(size)]
    return "".join(relabel[puzzle[j]] for j in idx), "".join(relabel[solution[j]] for j in idx)


_MAX_EMPTY_MISSES = 40


def generate_puzzles(size: int, n: int, min_givens: int, max_givens: int, seed: int,
                     base_per_givens: int = 8) -> list[dict]:
    """`n` uniquely solvable puzzles with givens uniform over the reachable values in [min_givens, max_givens],
    reproducible for a seed: a pool of `base_per_givens` truly generated base puzzles per givens value, each
    output a random symmetry of one base. Unreachable values are skipped; ValueError if none is reachable."""
    box_shape(size)
    cells = size * size
    if not 0 <= min_givens <= max_givens <= cells:
        raise ValueError(f"need 0 <= min_givens <= max_givens <= {cells}, got {min_givens}, {max_givens}")
    if n < 0 or base_per_givens < 1:
        raise ValueError("need n >= 0 and base_per_givens >= 1")
    rng = random.Random(seed)
    pools: dict[int, list[tuple[str, str]]] = {g: [] for g in range(min_givens, max_givens + 1)}
    for g in range(min_givens, max_givens + 1):
        pool, fails = pools[g], 0
        # retries per missing base; a value with no base after _MAX_EMPTY_MISSES tries counts as unreachable
        while len(pool) < base_per_givens and fails < 8 * base_per_givens and (pool or fails < _MAX_EMPTY_MISSES):
            sol = random_solution(size, rng)
            puz = make_unique_puzzle(sol, size, g, rng)
            k = cells - puz.count("0")
            if k == g:
                pool.append((puz, sol))
            else:
                fails += 1
                if k in pools and len(pools[k]) < base_per_givens:
                    pools[k].append((puz, sol))  # a stalled (minimal) puzzle still serves its own value
    reachable = [g for g in sorted(pools) if pools[g]]
    if not reachable:
        raise ValueError(f"no {size}x{size} puzzle with {min_givens}..{max_givens} givens could be generated")
    out = []
    for _ in range(n):
        g = rng.choice(reachable)
        puz, sol = transform(*rng.choice(pools[g]), size, rng)
        out.append({"puzzle": puz, "solution": sol, "givens": g})
    return out


def bucket(givens: int, size: int) -> str | None:
    """Difficulty for 9x9 (easy >= 40, medium 30-39, hard < 30); None for other sizes."""
    if size != 9:
        return None
    return "easy" if givens >= 40 else "medium" if givens >= 30 else "hard"


def _units_ok(grid: str, size: int, allow_blank: bool) -> bool:
    """Every row, column and box has no repeated digit (and, unless allow_blank, no blank)."""
    for unit in _geom(size)[3]:
        vals = [grid[i] for i in unit if grid[i] != "0"]
        if len(set(vals)) != len(vals) or (not allow_blank and len(vals) != size):
            return False
    return True


def check_grid(puzzle: str, candidate: str, size: int) -> dict:
    """{'valid': complete grid obeying the rules, 'givens_kept': every given unchanged, 'solved': both}."""
    digits = set("123456789"[:size])
    cells = size * size
    valid = len(candidate) == cells and set(candidate) <= digits and _units_ok(candidate, size, False)
    kept = len(candidate) == cells and all(p in "0." or p == c for p, c in zip(puzzle, candidate))
    return {"valid": bool(valid), "givens_kept": bool(kept), "solved": bool(valid and kept)}


def _clean(text: str) -> str:
    return "".join(ch for ch in text if ch != "|" and not ch.isspace())


def parse_grid(text: str, size: int) -> str | None:
    """The answer grid in model output: drop whitespace and '|', keep the first size*size characters;
    None if too short or any of them is not a digit 1..size."""
    cells = size * size
    grid = _clean(text)[:cells]
    if len(grid) < cells or not set(grid) <= set("123456789"[:size]):
        return None
    return grid


def grade(puzzle: str, solution: str | None, output_text: str, size: int) -> dict:
    """{'solved', 'exact', 'cell_acc', 'parse_fail'} as floats. `exact` falls back to `solved` without a
    reference solution; `cell_acc` is over the puzzle's blanks against `solution` (or a solver's solution)."""
    puzzle = puzzle.replace(".", "0")
    grid = parse_grid(output_text, size)
    solved = grid is not None and check_grid(puzzle, grid, size)["solved"]
    exact = (grid == solution) if solution else solved
    ref = solution or solve(puzzle, size)
    blanks = [i for i, ch in enumerate(puzzle) if ch == "0"]
    raw = _clean(output_text)
    if ref is None:
        cell_acc = 0.0
    elif not blanks:
        cell_acc = float(solved)
    else:
        cell_acc = sum(1 for i in blanks if i < len(raw) and raw[i] == ref[i]) / len(blanks)
    return {"solved": float(solved), "exact": float(exact), "cell_acc": cell_acc, "parse_fail": float(grid is None)}


def read_csv(path, size: int | None = None) -> list[dict]:
    """Rows {'puzzle', 'solution' ('' if absent), 'givens'} of a CSV with header `puzzle,solution`.
    Size is inferred from the first row when None. Malformed rows, a puzzle without a solution column that has
    no solution, and a file without rows raise SudokuFormatError naming the path (and 1-based line); puzzles
    without a solution column that have several solutions are counted (one stderr line) and graded by the rules.
    A missing file raises FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sudoku CSV file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()

    def fail(lineno: int, reason: str):
        raise SudokuFormatError(f"{path}, line {lineno}: {reason}")

    if not lines or [h.strip().lower() for h in lines[0].split(",")] != ["puzzle", "solution"]:
        fail(1, f"wrong header {lines[0] if lines else ''!r}, expected 'puzzle,solution'")
    rows, multi = [], 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [x.strip() for x in line.split(",")]
        if len(fields) != 2:
            fail(lineno, f"wrong number of fields ({len(fields)}, expected 2)")
        puzzle, solution = fields
        if size is None:
            size = {16: 4, 81: 9}.get(len(puzzle))
            if size is None:
                fail(lineno, f"wrong length: puzzle has {len(puzzle)} characters, expected 16 (4x4) or 81 (9x9)")
        cells, digits = size * size, "123456789"[:size]
        if len(puzzle) != cells:
            fail(lineno, f"wrong length: puzzle has {len(puzzle)} characters, expected {cells}")
        bad = [ch for ch in puzzle if ch not in digits + "0."]
        if bad:
            fail(lineno, f"bad character {bad[0]!r} in puzzle (allowed: 1-{size}, '0' or '.')")
        puzzle = puzzle.replace(".", "0")
        if not _units_ok(puzzle, size, True):
            fail(lineno, "puzzle givens contradict each other (duplicate in a row, column or box)")
        if solution:
            if len(solution) != cells:
                fail(lineno, f"wrong length: solution has {len(solution)} characters, expected {cells}")
            bad = [ch for ch in solution if ch not in digits]
            if bad:
                fail(lineno, f"bad character {bad[0]!r} in solution (allowed: 1-{size})")
            check = check_grid(puzzle, solution, size)
            if not check["valid"]:
                fail(lineno, "solution not valid (a row, column or box repeats a digit)")
            if not check["givens_kept"]:
                fail(lineno, "solution does not match the puzzle's givens")
        else:  # graded by the rules: an unsolvable puzzle cannot be graded, several solutions are counted
            n_sol = count_solutions(puzzle, size, limit=2)
            if n_sol == 0:
                fail(lineno, "puzzle has no solution (its givens admit no valid completion)")
            multi += n_sol > 1
        rows.append({"puzzle": puzzle, "solution": solution, "givens": cells - puzzle.count("0")})
    if not rows:
        raise SudokuFormatError(f"{path}: no puzzle rows (only the header 'puzzle,solution')")
    if multi:
        print(f"[dgtune] {path}: {multi} puzzle(s) without a solution have several solutions; any valid completion "
              "keeping the givens counts as solved", file=sys.stderr)
    return rows


def format_prompt(puzzle: str) -> str:
    """User message content for a puzzle: 'sudoku:' + puzzle."""
    return "sudoku:" + puzzle


def format_response(solution: str) -> str:
    """Target response for a solution: the grid string itself."""
    return solution
