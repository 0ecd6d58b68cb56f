"""What issue 15's Sudoku recipe adds: the unit-constraint auxiliary loss, fresh generated training puzzles, the
compact prompt, and the learning curve written during training."""

import json

import pytest
import torch

from dgtune.data import encode_rows
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.eval.curve import append_point, curve_point, read_curve
from dgtune.tasks.sudoku import engine as sudoku
from dgtune.tasks.sudoku import SudokuTask

pytestmark = pytest.mark.trains  # trains with trainer.mixed_precision=auto: .ci/run reruns it under auto's other outcome


def one_hot_digits(grid: str, n: int) -> torch.Tensor:
    """[1, n*n, n] one-hot digit distribution of a full grid."""
    return torch.nn.functional.one_hot(torch.tensor([int(ch) - 1 for ch in grid]), n).float()[None]


@pytest.mark.parametrize("size", [4, 9])
def test_unit_constraint_is_zero_on_solutions_and_positive_on_violations(size):
    task = SudokuTask(size, (size, size * size - 2))
    digit_ids = torch.arange(10, 10 + size)
    sol = sudoku.random_solution(size, __import__("random").Random(3))
    clean = torch.tensor([[10 + int(ch) - 1 for ch in sol]])  # token ids of the digits
    assert task.aux_loss(one_hot_digits(sol, size), clean, None, digit_ids).item() == 0.0
    swapped = sol[1] + sol[0] + sol[2:]  # two cells of one row swapped: columns (and maybe a box) now repeat
    assert task.aux_loss(one_hot_digits(swapped, size), clean, None, digit_ids).item() > 0
    uniform = torch.full((1, size * size, size), 1.0 / size)  # each digit sums to exactly one in every unit
    assert task.aux_loss(uniform, clean, None, digit_ids).item() == pytest.approx(0.0, abs=1e-12)
    # template cells count with their given digit, whatever the model predicts there
    keep = torch.zeros(1, size * size, dtype=torch.bool)
    keep[0, :2] = True
    wrong_at_givens = one_hot_digits(swapped[:2] + sol[2:], size)
    assert task.aux_loss(wrong_at_givens, clean, keep, digit_ids).item() == 0.0


def test_aux_loss_enters_the_training_loss_with_its_weight(tiny):
    model, tok = tiny
    task = SudokuTask(4, (6, 10), canvas_length=24, use_template=True, compact_prompt=True)
    items = encode_rows(tok, task.fresh_rows(4, seed=1), 24, task)
    from dgtune.data import collate_train

    batch = collate_train(items, tok.pad_token_id)
    aux = (task, torch.tensor(task.aux_token_ids(tok)))
    base = ObjectiveConfig(kind="masked", self_cond_p=0.0, ar_weight=0.0)
    with_aux = ObjectiveConfig(kind="masked", self_cond_p=0.0, ar_weight=0.0, aux_weight=2.0)
    out0 = denoising_loss(model, batch, base, torch.Generator().manual_seed(0), len(tok), tok.mask_token_id, aux=aux)
    out1 = denoising_loss(model, batch, with_aux, torch.Generator().manual_seed(0), len(tok), tok.mask_token_id, aux=aux)
    assert "aux_loss" not in out0 and out1["aux_loss"] > 0
    assert out1["loss"].item() == pytest.approx(out0["loss"].item() + 2.0 * out1["aux_loss"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="aux_weight"):
        denoising_loss(model, batch, with_aux, torch.Generator().manual_seed(0), len(tok), tok.mask_token_id)


def test_fresh_rows_are_new_unique_puzzles_and_a_function_of_the_seed():
    task = SudokuTask(9, (30, 40), use_template=True, compact_prompt=True, fresh_per_base=4)
    rows = task.fresh_rows(10, seed=5)
    assert rows == task.fresh_rows(10, seed=5) and len(rows) == 10
    assert {r["puzzle"] for r in rows}.isdisjoint({r["puzzle"] for r in task.fresh_rows(10, seed=6)})
    assert len({r["puzzle"] for r in rows}) == 10  # symmetries of one base differ from each other
    for r in rows:
        assert r["prompt"] == "sudoku:" and r["response"] == r["solution"]
        assert sudoku.count_solutions(r["puzzle"], 9) == 1 and sudoku.solve(r["puzzle"], 9) == r["solution"]
        assert r["givens"] == 81 - r["puzzle"].count("0") and 30 <= r["givens"] <= 45


def test_compact_prompt_needs_the_template_and_keeps_the_grid_in_the_canvas(tiny):
    with pytest.raises(ValueError, match="task.template"):
        SudokuTask(9, (30, 40), compact_prompt=True)
    _, tok = tiny
    task = SudokuTask(4, (6, 10), canvas_length=24, use_template=True, compact_prompt=True)
    row = task.row_from_prompt("sudoku:1200" + "0" * 12)
    assert row["prompt"] == "sudoku:" and row["puzzle"].startswith("12")
    tmpl = task.template_tensor(tok, [row])[0]
    assert tmpl[0] == tok.convert_tokens_to_ids("1") and tmpl[1] == tok.convert_tokens_to_ids("2") and tmpl[2] == -1


def test_learning_curve_points_replace_later_ones_after_a_resume(tmp_path):
    recs = [{"steps": 12, "solved": s, "cell_acc": 0.5} for s in (1, 0, 0, 1)]
    append_point(tmp_path, curve_point(10, 640, recs, [12]))
    append_point(tmp_path, curve_point(20, 1280, recs[:2], [12]))
    append_point(tmp_path, curve_point(20, 1280, recs[1:3], [12]))  # resumed run, same step: replaced, not duplicated
    pts = read_curve(tmp_path)
    assert [p["step"] for p in pts] == [10, 20] and pts[1]["solved@12"] == 0.0 and pts[0]["solved@12"] == 0.5
    assert 0 < pts[0]["solved_lo@12"] < 0.5 < pts[0]["solved_hi@12"] < 1
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("max_steps", [3, 4])  # 4: max_steps a multiple of quick_every (the final point was lost)
def test_train_with_fresh_data_writes_the_learning_curve(tmp_path, max_steps):
    from dgtune.config import compose
    from dgtune.train import train

    cfg = compose(["recipe=sudoku_solve", "task=sudoku4", "task.template=true", "task.compact_prompt=true",
                   "task.fresh=true", "task.canvas_length=24", "task.train_givens=[6,10]", "task.n_train=8",
                   "task.n_val=8", "task.n_test=4", "eval.quick_bucket=null", f"trainer.max_steps={max_steps}",
                   "trainer.batch_size=4", "eval.quick_every=2", "eval.quick_n=4", "eval.at_end=false",
                   "trainer.progress_bar=false", "trainer.log_every=1", f"run_dir={tmp_path / 'run'}",
                   f"data_dir={tmp_path / 'data'}", "trainer.max_minutes=null"])
    train(cfg)
    pts = read_curve(tmp_path / "run")
    assert [p["step"] for p in pts] == [2, max_steps] and [p["sequences"] for p in pts] == [8, 4 * max_steps]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/aux_loss" in m for m in metrics)


@pytest.mark.parametrize("size", [4, 9])
def test_boxes_layout_round_trips_and_places_cells_after_their_markers(size, tiny):
    _, tok = tiny
    task = SudokuTask(size, (size * size // 2, size * size // 2 + 4), use_template=True, compact_prompt=True,
                      layout="boxes")
    row = task.fresh_rows(1, seed=2)[0]
    assert task.grade(row, row["response"])["solved"] == 1.0  # the marked-up response parses back to the grid
    assert "".join(row["response"][p] for p in task.cell_positions) == row["solution"]
    tmpl = task.canvas_template(row)
    assert all(tmpl[p] == (ch if ch != "0" else None) for p, ch in zip(task.cell_positions, row["puzzle"]))
    assert all(t is not None and not t.isdigit() for i, t in enumerate(tmpl) if i not in task.cell_positions)
    # the constraint loss and the rule guide read the cells at their canvas positions
    items = encode_rows(tok, [row], task.canvas_length, task)
    clean = torch.tensor([items[0]["canvas"]])
    digit_ids = torch.tensor(task.aux_token_ids(tok))
    probs = (clean[..., None] == digit_ids).float()  # [1, l, n] one-hot digits (markers: all zero)
    assert task.aux_loss(probs, clean, None, digit_ids).item() == 0.0
    guide = task.make_guide(tok, [row])
    fixed = torch.ones_like(clean, dtype=torch.bool)
    assert not guide(clean, fixed, torch.arange(1)).any()
    bad = clean.clone()
    a, b = task.cell_positions[0], task.cell_positions[1]
    bad[0, b] = clean[0, a]  # two equal digits in one row
    assert guide(bad, fixed, torch.arange(1))[0, [a, b]].all()
    with pytest.raises(ValueError, match="canvas_length"):
        SudokuTask(size, (5, 8), canvas_length=size * size + 1, layout="boxes")
