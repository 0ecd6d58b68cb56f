"""Pretraining tasks, the mixture, `task=jsonl` (the alias of `task=data`) and the data pipeline (canvas, templates, batches)."""

import json

import pytest

from dgtune.data import batch_indices, collate_train, encode_rows
from dgtune.tasks.base import Mixture
from dgtune.tasks.registry import build_task
from dgtune.tasks.sudoku import SudokuTask
from dgtune.tasks.synthetic import AdditionTask, LatinSquareTask, ReverseTask, SortTask, latin_valid


def test_synthetic_tasks_grade_their_own_references():
    for task in (LatinSquareTask(4), LatinSquareTask(9), SortTask(), ReverseTask(), AdditionTask()):
        rows = task.build_split("train", 20, seed=1)
        assert rows == task.build_split("train", 20, seed=1) and rows != task.build_split("test", 20, seed=1)
        for row in rows:
            assert task.grade(row, row["response"])["solved"] == 1.0
            assert task.grade(row, "")["solved"] == 0.0
    row = LatinSquareTask(4).build_split("train", 1, 0)[0]
    bad = row["solution"][1] + row["solution"][0] + row["solution"][2:]
    assert not latin_valid(row["puzzle"], bad, 4) or row["puzzle"][:2] == "00"


def test_mixture_follows_weights():
    mix = Mixture([SortTask(), ReverseTask()], [3, 1], canvas_length=61)
    rows = mix.build_split("train", 400, seed=0)
    assert sum(r["task"] == "sort" for r in rows) == 300
    assert mix.grade(rows[0], rows[0]["response"])["solved"] == 1.0


def test_jsonl_alias_is_the_data_task_and_names_bad_lines(tmp_path):
    from dgtune.config import compose
    from dgtune.tasks.data import DataTask

    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({"prompt": "add:1+2", "response": "3"}) + "\n\n" + json.dumps({"prompt": "x", "response": "y"}) + "\n")
    cfg = compose(["task=jsonl", f"task.files.train={good}", f"task.files.test={good}"])
    task = build_task(cfg.task)
    assert isinstance(task, DataTask) and task.name == "jsonl" and task.canvas_length == 88
    rows = task.build_split("test", 0, 0)
    assert len(rows) == 2 and rows[0]["task"] == "jsonl"
    assert task.grade(rows[0], " 3 ")["solved"] == 1.0 and task.grade(rows[0], "4")["solved"] == 0.0
    DataTask("mine", {"train": str(good)}, 8, verifier="json:loads")  # any importable callable works
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        DataTask("mine", {"test": str(bad)}, 8).build_split("test", 0, 0)
    with pytest.raises(ValueError, match="module:function"):
        DataTask("mine", {}, 8, verifier="nocolon")


def test_canvas_and_template_encoding(tiny):
    _, tok = tiny
    task = SudokuTask(4, (6, 8), None, canvas_length=20, use_template=True)
    rows = task.build_split("train", 4, seed=0)
    items = encode_rows(tok, rows, 20, task)
    for row, it in zip(rows, items):
        text = tok.decode(it["canvas"][:16])
        assert text == row["solution"]
        assert it["canvas"][16:] == [tok.eos_token_id] * 4
        known = [i for i, ch in enumerate(row["puzzle"]) if ch != "0"]
        assert [i for i, t in enumerate(it["template"]) if t >= 0] == known
        assert all(it["template"][i] == it["canvas"][i] for i in known)
    batch = collate_train(items, tok.pad_token_id)
    assert batch["canvas_keep"].shape == (4, 20) and batch["canvas_keep"].sum() == sum(r["givens"] for r in rows)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="canvas_length"):
        encode_rows(tok, rows, 10)


def test_batch_order_is_a_pure_function_of_step():
    a = [batch_indices(100, 16, s, seed=3) for s in range(12)]
    assert a == [batch_indices(100, 16, s, seed=3) for s in range(12)]
    epoch0 = sum(a[:6], [])
    assert len(set(epoch0)) == 96  # no repeats within an epoch
    assert a[:6] != a[6:12]
