"""The structured task families: countdown, schema-constrained JSON records, graph colouring."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dgtune.data import encode_rows
from dgtune.tasks import build_task
from dgtune.tasks.coloring import ColoringLevel, ColoringTask, chance_solved, format_answer
from dgtune.tasks.countdown import CountdownError, CountdownTask, parse_expression, verify as cd_verify
from dgtune.tasks.json_record import JsonRecordTask, parse_text, to_json, to_surface, verify as rec_verify

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("countdown", "json_record", "coloring")


@pytest.fixture(scope="module")
def bundled_tok():
    """The bundled tiny model's tokenizer: every prompt and answer must be written in its characters."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "dgtune/assets/tiny-diffusiongemma")


def _task(name: str, **over):
    cfg = OmegaConf.load(ROOT / f"configs/task/{name}.yaml")
    return build_task(OmegaConf.merge(cfg, over))


@pytest.mark.parametrize("name", FAMILIES)
def test_generated_rows_are_seeded_balanced_encodable_and_solved_by_their_reference(name, bundled_tok):
    task = _task(name, template=name != "countdown")
    rows = task.build_split("test", 30, seed=0)
    assert rows == task.build_split("test", 30, seed=0)
    assert rows != task.build_split("train", 30, seed=0) and rows != task.build_split("test", 30, seed=1)
    buckets = [r["bucket"] for r in rows]
    assert sorted(set(buckets)) == sorted(task.levels) and all(buckets.count(b) == 10 for b in task.levels)
    items = encode_rows(bundled_tok, rows, task.canvas_length, task)  # raises if an answer outgrows the canvas
    for row, it in zip(rows, items):
        assert bundled_tok.unk_token_id not in it["prompt"] + it["response"], row
        text = bundled_tok.decode(it["canvas"], skip_special_tokens=True)
        assert text == row["response"]  # the round trip through the tokenizer keeps the answer (spaces included)
        grade = task.grade(row, text)
        assert grade == {"solved": 1.0, "cell_acc": 1.0, "parse_fail": 0.0, "exact": 1.0}
        assert task.grade(row, "")["solved"] == 0.0 and task.grade(row, "")["parse_fail"] == 1.0
        if task.use_template:  # template pieces are the answer's own tokens at their positions
            known = [i for i, t in enumerate(it["template"]) if t >= 0]
            assert known and all(it["template"][i] == it["canvas"][i] for i in known)
            assert len(known) < len(row["response"])  # the values / colours stay free


def test_countdown_verifier_follows_the_rules():
    numbers, target = [3, 7, 9], 30
    assert cd_verify(numbers, target, "3*(9+7)-18")["solved"] == 0.0  # 18 is not given
    for right in ("3*7+9", "9+7*3", " 7 * 3 + 9 ", "(9+7*3)"):  # several are right
        assert cd_verify(numbers, target, right)["solved"] == 1.0, right
    assert cd_verify([6, 4, 8], 12, "8:4*6")["solved"] == 1.0 and cd_verify([6, 4, 8], 12, "6:4*8")["solved"] == 1.0
    assert cd_verify(numbers, target, "3*3+7+9+5")["solved"] == 0.0  # 3 used twice, 5 not given
    twice = cd_verify(numbers, target, "3*9+3")
    assert twice == {"solved": 0.0, "cell_acc": 0.0, "parse_fail": 0.0}
    assert cd_verify(numbers, target, "9+7")["cell_acc"] == 1.0 and cd_verify(numbers, target, "9+7")["solved"] == 0.0
    assert cd_verify([6, 4], 10, "6+4", require_all=True)["solved"] == 1.0
    assert cd_verify([6, 4, 2], 10, "6+4", require_all=True)["solved"] == 0.0  # d1's rule: every number once
    assert parse_expression("7:2")[0] * 2 == 7  # exact rational division
    assert cd_verify([4, 8], 2, "8:4")["solved"] == 1.0 and cd_verify([4, 8], 2, "8:4-0")["solved"] == 0.0
    for bad in ("3*", "(3+7", "3+7)", "3/7", "-3+9", "", "3=3", "9:(7-7)"):
        with pytest.raises(CountdownError):
            parse_expression(bad)
        assert cd_verify([3, 7, 7, 9], 10, bad)["parse_fail"] == 1.0


def test_record_verifier_checks_json_schema_and_values():
    record = {"id": 17, "name": "bob", "qty": 3, "price": None, "paid": False}
    ref = to_surface(record)
    assert json.loads(to_json(ref)) == record
    shuffled = '(#paid#:false, #price#:null,#qty#:3,#name#:#bob#,#id#:17)'  # any key order, any spacing
    assert rec_verify(record, shuffled)["solved"] == 1.0
    wrong_value = rec_verify(record, ref.replace("#bob#", "#bib#"))
    assert wrong_value == {"solved": 0.0, "cell_acc": 0.8, "parse_fail": 0.0}
    for bad_schema in ('(#id#:#17#,#name#:#bob#,#qty#:3,#price#:null,#paid#:false)',  # id as a string
                       '(#id#:17,#name#:#bob#,#qty#:3,#price#:null,#paid#:0)',  # bool as a number
                       '(#id#:17,#name#:#bob#,#qty#:3,#paid#:false)',  # a key missing
                       '(#id#:17,#name#:#bob#,#qty#:3,#price#:null,#paid#:false,#day#:2)'):  # an extra key
        out = rec_verify(record, bad_schema)
        assert out["solved"] == 0.0 and out["parse_fail"] == 0.0, bad_schema
    for not_json in ('(#id#:17,#id#:17,#name#:#bob#,#qty#:3,#price#:null,#paid#:false)',  # duplicate key
                     '(#id#:017,#name#:#bob#,#qty#:3,#price#:null,#paid#:false)',  # leading zero
                     '(#id#:1 7,#name#:#bob#,#qty#:3,#price#:null,#paid#:false)', "[17]", "(#id#:17"):
        assert rec_verify(record, not_json)["parse_fail"] == 1.0, not_json
    partial = rec_verify(record, ref.replace("#bob#", "bob  ").replace(":3 ", ":5 "))  # name unquoted, qty wrong
    assert partial == {"solved": 0.0, "cell_acc": 0.6, "parse_fail": 1.0}  # id, price, paid still read right
    assert rec_verify({**record, "qty": 1}, ref.replace(":3 ", ":true"))["cell_acc"] == 0.8  # true is not 1
    assert parse_text("unpaid, box 4, 3 items, order 17, for bob") == record
    with pytest.raises(ValueError, match="unknown phrase"):
        parse_text("order 17, colour red")


def test_coloring_accepts_any_proper_colouring_and_levels_set_difficulty():
    task = ColoringTask({"tri": {"vertices": 3, "colors": 3, "edge_prob": 1.0}})
    row = task.build_split("test", 1, seed=0)[0]
    assert row["prompt"] == "color:3;ab,ac,bc" and row["response"] == "a1b2c3"
    assert task.grade(row, "a3b1c2")["solved"] == 1.0 and task.grade(row, "a3b1c2")["exact"] == 0.0  # any proper one
    assert task.grade(row, "a1b1c2") == {"solved": 0.0, "cell_acc": pytest.approx(2 / 3), "parse_fail": 0.0, "exact": 0.0}
    for bad in ("a1b2c4", "a1b2", "b1a2c3", "a1b2c3d1", "123"):
        assert task.grade(row, bad)["parse_fail"] == 1.0, bad
    sparse, dense = (ColoringTask({"x": {"vertices": 10, "edge_prob": p}}).build_split("test", 40, 0) for p in (0.2, 0.8))
    assert sum(r["givens"] for r in sparse) < sum(r["givens"] for r in dense)  # givens = edge count
    with pytest.raises(ValueError, match="bad colouring level"):
        ColoringLevel(vertices=30)
    assert format_answer([1, 2]) == "a1b2"
    assert chance_solved([(0, 1), (0, 2), (1, 2)], 3, 3) == pytest.approx(6 / 27)  # triangle: 3! proper of 3^3
    assert chance_solved([(0, 1), (1, 2)], 3, 3) == pytest.approx(12 / 27) and chance_solved([], 4, 3) == 1.0


def test_countdown_levels_set_the_number_count_and_target_range():
    task = CountdownTask({"big": {"count": 4, "max_num": 20, "min_target": 50, "max_target": 200}})
    for row in task.build_split("train", 50, seed=3):
        numbers = [int(x) for x in row["puzzle"].split(",")]
        assert len(numbers) == 4 and max(numbers) <= 20 and 50 <= int(row["solution"]) <= 200
        assert int(row["solution"]) not in numbers
    assert task.canvas_length == 4 * 2 + 3 * 4 - 3 + 1


def test_config_errors_and_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="no canvas template"):
        _task("countdown", template=True)
    with pytest.raises(ValueError, match="level 'x'.*fields of CountdownLevel"):
        _task("countdown", levels={"x": {"numbers": 3}})
    task = _task("coloring", template=True)
    path = tmp_path / "prompts.txt"
    path.write_text("color:2;ab,bc\n\ncolor:3;ab,ac,bc\n")
    rows = task.load_test_file(str(path))
    assert [task.grade(r, a)["solved"] for r, a in zip(rows, ["a1b2c1", "a1b2c3"])] == [1.0, 1.0]
    assert task.grade(rows[0], "a1b2c2")["solved"] == 0.0
    path.write_text("color:2;ab\ncolor:2;aa\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2: prompt edge 'aa'"):
        task.load_test_file(str(path))
    cd = _task("countdown").row_from_prompt("countdown:24;3,8,1")
    assert _task("countdown").grade(cd, "3*8*1")["solved"] == 1.0
    rec = _task("json_record").row_from_prompt("record:order 5, name al, qty 2, price 9, paid")
    assert _task("json_record").grade(rec, '(#id#:5,#name#:#al#,#qty#:2,#price#:9,#paid#:true)')["solved"] == 1.0


def test_templated_families_sample_and_grade_through_the_eval_runner(tiny):
    """Untrained model, two steps: template tokens are clamped in the canvas and every output gets graded."""
    from dgtune.data import prompt_ids
    from dgtune.eval.runner import evaluate
    from dgtune.sampling.sampler import SamplerConfig, sample

    model, tok = tiny
    for task in (JsonRecordTask(use_template=True), ColoringTask(use_template=True)):
        rows = [r for r in task.build_split("test", 12, seed=0) if r["bucket"] == sorted(task.levels)[0]][:3]
        records, _ = evaluate(model, tok, task, rows, [2], SamplerConfig(mode="fast"), 6, 0, "tuned")
        assert len(records) == 3 and all(0.0 <= r["cell_acc"] <= 1.0 for r in records)
        prompts = torch.tensor([prompt_ids(tok, rows[0]["prompt"])] * 3)  # one prompt length per batch
        template = task.template_tensor(tok, rows[:1]).repeat(3, 1)
        out = sample(model, prompts, SamplerConfig(max_steps=2, mode="fast"), torch.Generator().manual_seed(0),
                     tok.eos_token_id, tok.pad_token_id, task.canvas_length, row_seeds=torch.arange(3), template=template)
        is_eos = out.tokens == tok.eos_token_id  # an untrained model may end early: compare before EOS
        known = (template >= 0) & ((torch.cumsum(is_eos.long(), -1) - is_eos.long()) == 0)
        assert known.any() and torch.equal(out.tokens[known], template[known])


def test_countdown_reads_d1s_jsonl_test_file(tmp_path):
    """d1's public Countdown file (`{"input": "30,100,93", "output": "23"}` a line) is read as it is and graded
    by the rules (each number exactly once with `require_all`); a malformed line names the file and line."""
    from dgtune.errors import InputError
    from dgtune.tasks.countdown import CountdownTask

    good = tmp_path / "cd3.jsonl"
    good.write_text('{"input": "30,100,93", "output": "23"}\n\n{"input": "5,7,2", "output": "70"}\n')
    task = CountdownTask(require_all=True)
    rows = task.load_test_file(str(good))
    assert [r["prompt"] for r in rows] == ["countdown:23;30,100,93", "countdown:70;5,7,2"]
    assert task.grade(rows[0], "30-(100-93)")["solved"] == 1.0
    assert task.grade(rows[0], "30-7")["solved"] == 0.0  # 7 is not a given number
    assert task.grade(rows[1], "5*7*2")["solved"] == 1.0 and task.grade(rows[1], "7*(5+5)")["solved"] == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1,2,3", "output": "6"}\n{"input": "1,2"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected"):
        task.load_test_file(str(bad))


def test_countdown_numbers_with_leading_zeros_are_not_legal():
    """A number written with a leading zero ("04", "0057") is malformed, as in d1's checker (Python's eval: a syntax
    error), so it neither solves nor counts as legal, nor is relabelled; 0 alone and numbers with zeros inside are
    numbers. (Before, "04+15-15" solved a target of 4 with 4, 15, 15.)"""
    assert cd_verify([4, 15, 15], 4, "04+15-15", require_all=True) == {"solved": 0.0, "cell_acc": 0.0, "parse_fail": 1.0}
    assert cd_verify([57, 7, 4], 68, "0057+7+4", require_all=True)["parse_fail"] == 1.0
    assert cd_verify([4, 15, 15], 4, "4+15-15", require_all=True)["solved"] == 1.0
    assert cd_verify([100, 10, 1], 109, "100+10-1", require_all=True)["solved"] == 1.0
    assert parse_expression("0+5")[0] == 5
    with pytest.raises(CountdownError, match="leading zero"):
        parse_expression("3*(01+2)")
    task = CountdownTask({"cd3": {"count": 3, "max_num": 100, "min_target": 1, "max_target": 100}}, require_all=True)
    row = {**task.row_from_prompt("countdown:50;30,12,8"), "bucket": "cd3"}
    assert task.relabel(row, "030+12-8") is None and task.relabel(row, "30+12-8") is not None


def test_countdown_relabel_makes_a_legal_miss_the_answer_to_its_own_value():
    """Hindsight: a legal expression that misses the target answers the puzzle whose target is its value (same
    numbers, level and graded solved there); an illegal, fractional, out-of-range or number-valued one answers none."""
    task = CountdownTask({"cd3": {"count": 3, "max_num": 100, "min_target": 1, "max_target": 100}}, require_all=True)
    rows = [(r, [int(x) for x in r["puzzle"].split(",")]) for r in task.build_split("train", 40, 0)]
    row, (a, b, c) = next((r, n) for r, n in rows if sum(n) <= 100 and sum(n) != int(r["solution"]))
    new = task.relabel(row, f"{a}+{b}+{c}")
    assert new["prompt"] == f"countdown:{a + b + c};{a},{b},{c}" and new["bucket"] == row["bucket"] == "cd3"
    assert task.grade(new, f"{a}+{b}+{c}")["solved"] == 1.0 and task.grade(row, f"{a}+{b}+{c}")["solved"] == 0.0
    row = task.row_from_prompt("countdown:50;30,12,8")
    row["bucket"] = "cd3"
    assert task.relabel(row, "30+12-8")["prompt"] == "countdown:34;30,12,8"
    assert task.relabel(row, " (30-12)*8 ") is None  # 144 > max_target
    assert task.relabel(row, "30+12") is None  # require_all: 8 unused
    assert task.relabel(row, "30:12*8")["prompt"] == "countdown:20;30,12,8"  # a fraction on the way is legal
    assert task.relabel(row, "30:8+12") is None  # 15.75 is not whole
    assert task.relabel(row, "30+12-(8") is None  # does not parse
    assert task.relabel(row, "30-12-8+8-8") is None  # 8 three times
    assert task.relabel(task.row_from_prompt("countdown:50;4,2,2"), "4*2:2") is None  # 4 is one of the numbers
