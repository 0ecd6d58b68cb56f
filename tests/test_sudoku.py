import os
import random

import pytest

from dgtune.tasks.sudoku import engine as S

PUBLIC_4X4 = "/work/shared/benchmarks/sudoku_4x4_d1_test.csv"

# A known 9x9 puzzle (30 givens) and its unique solution.
P9 = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
S9 = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
SWAPPED = "".join(S9[r * 9 + 1] + S9[r * 9] + S9[r * 9 + 2:r * 9 + 9] for r in range(9))  # columns 0, 1 swapped


def _consistent(puzzle, solution):
    return all(p == "0" or p == s for p, s in zip(puzzle, solution))


@pytest.mark.parametrize("size,lo,hi,n", [(4, 4, 6, 60), (4, 7, 12, 60), (9, 22, 26, 25), (9, 30, 45, 60), (9, 46, 60, 30)])
def test_generated_unique_valid(size, lo, hi, n):
    out = S.generate_puzzles(size, n, lo, hi, seed=11, base_per_givens=3)
    assert len(out) == n
    for row in out:
        p, s, g = row["puzzle"], row["solution"], row["givens"]
        assert len(p) == len(s) == size * size
        assert lo <= g <= hi and g == size * size - p.count("0")
        assert S.count_solutions(p, size) == 1
        assert S.check_grid(p, s, size)["solved"] and _consistent(p, s)
        assert S.solve(p, size) == s


def test_generation_reproducible_and_seed_dependent():
    a = S.generate_puzzles(9, 50, 30, 45, seed=3, base_per_givens=2)
    b = S.generate_puzzles(9, 50, 30, 45, seed=3, base_per_givens=2)
    c = S.generate_puzzles(9, 50, 30, 45, seed=4, base_per_givens=2)
    assert a == b
    assert a != c
    assert S.generate_puzzles(4, 20, 4, 10, seed=3) == S.generate_puzzles(4, 20, 4, 10, seed=3)


def test_generation_errors():
    with pytest.raises(ValueError):
        S.generate_puzzles(9, 5, 3, 5, seed=0, base_per_givens=1)  # no 9x9 puzzle has < 17 givens
    with pytest.raises(ValueError):
        S.generate_puzzles(9, 5, 40, 30, seed=0)
    with pytest.raises(ValueError):
        S.box_shape(6)


def test_solver_basics():
    assert S.box_shape(4) == (2, 2) and S.box_shape(9) == (3, 3)
    assert S.count_solutions(P9, 9) == 1
    assert S.solve(P9, 9) == S9
    assert S.solve(P9.replace("0", "."), 9) == S9
    assert S.count_solutions("0" * 16, 4, limit=10) == 10
    assert S.count_solutions("0" * 16, 4, limit=1000) == 288
    bad = "55" + P9[2:]  # duplicate 5 in row 0
    assert S.count_solutions(bad, 9) == 0 and S.solve(bad, 9) is None
    rng = random.Random(0)
    for size in (4, 9):
        sol = S.random_solution(size, rng)
        assert S.check_grid("0" * size * size, sol, size)["valid"]
    assert S.random_solution(9, random.Random(1)) != S.random_solution(9, random.Random(2))


def test_make_unique_puzzle():
    rng = random.Random(5)
    sol = S.random_solution(9, rng)
    p = S.make_unique_puzzle(sol, 9, 35, rng)
    assert 81 - p.count("0") == 35 and _consistent(p, sol) and S.count_solutions(p, 9) == 1
    p = S.make_unique_puzzle(sol, 9, 0, rng)  # stalls at a minimal puzzle
    assert 17 <= 81 - p.count("0") < 35 and S.count_solutions(p, 9) == 1
    for i in range(81):  # minimal: no given can be removed
        if p[i] != "0":
            assert S.count_solutions(p[:i] + "0" + p[i + 1:], 9) == 2
            break


def test_transform_preserves():
    rng = random.Random(9)
    seen = set()
    for _ in range(30):
        p2, s2 = S.transform(P9, S9, 9, rng)
        seen.add(p2)
        assert p2.count("0") == P9.count("0")
        assert S.check_grid(p2, s2, 9)["solved"] and _consistent(p2, s2)
        assert S.count_solutions(p2, 9) == 1
    assert len(seen) > 25
    p4, s4 = "1000000000000000", "1234341221434321"
    assert S.check_grid(p4, s4, 4)["solved"]
    for _ in range(10):
        q, t = S.transform(p4, s4, 4, rng)
        assert S.check_grid(q, t, 4)["solved"] and q.count("0") == 15


def test_check_grid_rejections():
    assert S.check_grid(P9, S9, 9) == {"valid": True, "givens_kept": True, "solved": True}
    empty = "0" * 81

    def swap(g, i, j):
        g = list(g)
        g[i], g[j] = g[j], g[i]
        return "".join(g)

    row_bad = swap(S9, 0, 9)  # same column and box: only rows 0 and 1 get a duplicate
    col_bad = swap(S9, 0, 1)  # same row and box: only columns 0 and 1 get a duplicate
    box_bad = S9[27:36] + S9[9:27] + S9[0:9] + S9[36:]  # rows 0 and 3 swapped: only boxes broken
    for bad in (row_bad, col_bad, box_bad):
        assert S.check_grid(empty, bad, 9) == {"valid": False, "givens_kept": True, "solved": False}
    assert S.check_grid(empty, SWAPPED, 9)["valid"]  # sanity: a column swap inside a stack stays valid
    res = S.check_grid(P9, SWAPPED, 9)  # ...but changes givens
    assert res == {"valid": True, "givens_kept": False, "solved": False}
    assert not S.check_grid("0" * 16, "1234234134124123", 4)["valid"]  # Latin square, box duplicate
    assert S.check_grid("2000000000000000", "1234341221434321", 4)["givens_kept"] is False
    assert not S.check_grid(P9, S9[:-1], 9)["valid"]
    assert not S.check_grid("0" * 16, "123434122143432x", 4)["valid"]


def test_parse_and_grade():
    assert S.parse_grid("  1234\n3412|2143\n4321 trailing", 4) == "1234341221434321"
    assert S.parse_grid("123", 4) is None and S.parse_grid("1234341221434325", 4) is None
    g = S.grade(P9, S9, S9 + "\n", 9)
    assert g == {"solved": 1.0, "exact": 1.0, "cell_acc": 1.0, "parse_fail": 0.0}
    blanks = [i for i, c in enumerate(P9) if c == "0"]
    wrong = list(S9)
    wrong[blanks[0]], wrong[blanks[1]] = "0", "0"
    wrong = "".join(wrong)
    g = S.grade(P9, S9, wrong, 9)  # '0' is not a digit 1..9 -> parse failure, partial cell accuracy
    assert g["solved"] == 0.0 and g["exact"] == 0.0 and g["parse_fail"] == 1.0
    assert g["cell_acc"] == pytest.approx((len(blanks) - 2) / len(blanks))
    wrong2 = S9[:blanks[0]] + str(int(S9[blanks[0]]) % 9 + 1) + S9[blanks[0] + 1:]
    g = S.grade(P9, S9, wrong2, 9)
    assert g["solved"] == 0.0 and g["exact"] == 0.0 and g["parse_fail"] == 0.0
    assert g["cell_acc"] == pytest.approx(1 - 1 / len(blanks))
    g = S.grade(P9, S9, "I don't know", 9)
    assert g == {"solved": 0.0, "exact": 0.0, "cell_acc": 0.0, "parse_fail": 1.0}
    # No reference: exact follows the rules; cell_acc uses the solver.
    g = S.grade(P9, None, S9, 9)
    assert g["exact"] == 1.0 and g["cell_acc"] == 1.0
    # Puzzle with several solutions: an alternative valid answer is solved but not exact.
    p4 = "1200340000000000"
    sols = [s for s in ("1234341221434321", "1234341223414123") if S.check_grid(p4, s, 4)["solved"]]
    assert len(sols) == 2 and S.count_solutions(p4, 4) >= 2
    g = S.grade(p4, sols[0], sols[1], 4)
    assert g["solved"] == 1.0 and g["exact"] == 0.0
    assert S.grade(p4, "", sols[1], 4)["exact"] == 1.0


def test_bucket():
    assert S.bucket(29, 9) == "hard" and S.bucket(22, 9) == "hard"
    assert S.bucket(30, 9) == "medium" and S.bucket(39, 9) == "medium"
    assert S.bucket(40, 9) == "easy" and S.bucket(60, 9) == "easy"
    assert S.bucket(10, 4) is None


def test_format():
    assert S.format_prompt("1200") == "sudoku:1200"
    assert S.format_response(S9) == S9


def test_read_csv_good(tmp_path):
    f = tmp_path / "good.csv"
    p4 = "1.00340000000000"
    f.write_text(f" puzzle , solution \n{P9},{S9}\n{P9.replace('0', '.')},\n\n")
    rows = S.read_csv(f)
    assert rows == [{"puzzle": P9, "solution": S9, "givens": 30}, {"puzzle": P9, "solution": "", "givens": 30}]
    f4 = tmp_path / "four.csv"
    f4.write_text(f"puzzle,solution\n{p4},1234341221434321\n")
    assert S.read_csv(str(f4), 4) == [{"puzzle": "1000340000000000", "solution": "1234341221434321", "givens": 3}]
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        S.read_csv(tmp_path / "nope.csv")


BAD_ROWS = {
    "wrong number of fields": f"{P9},{S9},x",
    "wrong length": P9[:-1] + "," + S9,
    "bad character": P9[:-1] + "a," + S9,
    "contradict": "55" + P9[2:] + ",",
    "does not match": f"{P9},{SWAPPED}",
    "not valid": f"{P9[:-1]}0,{S9[:-1]}8",
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_read_csv_malformed(tmp_path, reason):
    f = tmp_path / "bad.csv"
    f.write_text(f"puzzle,solution\n{P9},{S9}\n{BAD_ROWS[reason]}\n")
    with pytest.raises(S.SudokuFormatError) as e:
        S.read_csv(f)
    msg = str(e.value)
    assert str(f) in msg and "line 3" in msg and reason in msg


def test_read_csv_bad_header_and_size(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text(f"quiz,answer\n{P9},{S9}\n")
    with pytest.raises(S.SudokuFormatError, match=r"line 1: wrong header"):
        S.read_csv(f)
    f.write_text(f"puzzle,solution\n{P9},{S9}\n")
    with pytest.raises(S.SudokuFormatError, match=r"line 2: wrong length"):
        S.read_csv(f, size=4)


@pytest.mark.skipif(not os.path.exists(PUBLIC_4X4), reason="public 4x4 benchmark not present")
def test_read_public_4x4():
    rows = S.read_csv(PUBLIC_4X4)
    assert len(rows) == 500
    multi = sum(S.count_solutions(r["puzzle"], 4) > 1 for r in rows)
    assert multi == 124
    for r in rows:
        assert len(r["puzzle"]) == 16 and S.count_solutions(r["puzzle"], 4) >= 1
        g = S.grade(r["puzzle"], None, r["solution"], 4)  # several solutions: grade by rules
        assert g["solved"] == 1.0 and g["exact"] == 1.0 and g["parse_fail"] == 0.0
