import json
import math

import numpy as np
import pytest

from dgtune.eval.report import (add_steps_to_plateau, aggregate, format_table,
                                plot_accuracy_vs_steps, proportion_ci, write_report)


def _rec(model, steps, bucket, solved, cell, nfe, sampler="eb"):
    return {"model": model, "sampler": sampler, "steps": steps, "bucket": bucket, "solved": solved,
            "exact": solved, "cell_acc": cell, "parse_fail": 0.0, "nfe": nfe}


def _records():
    recs = []
    for steps, sols in ((1, [0, 0, 1, 0]), (2, [1, 0, 1, 1])):
        buckets = ["easy", "easy", "hard", None]
        for i, (s, b) in enumerate(zip(sols, buckets)):
            recs.append(_rec("tuned", steps, b, float(s), 0.5 + 0.1 * i, float(steps)))
    return recs


def test_proportion_ci_contains_rate_narrows_symmetric():
    for k, n in ((3, 20), (300, 2000), (1, 64)):
        lo, hi = proportion_ci(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert (proportion_ci(300, 2000)[1] - proportion_ci(300, 2000)[0]) < (proportion_ci(3, 20)[1] - proportion_ci(3, 20)[0])
    lo, hi = proportion_ci(5, 64)
    lo2, hi2 = proportion_ci(59, 64)
    assert math.isclose(lo, 1 - hi2) and math.isclose(hi, 1 - lo2)
    assert all(math.isnan(v) for v in proportion_ci(0, 0))
    with pytest.raises(ValueError):
        proportion_ci(5, 4)


def test_interval_not_degenerate_at_0_and_1():
    # 0 of 64 solved: the exact (Clopper-Pearson) 95% upper bound is 1 - 0.025 ** (1 / 64); a percentile bootstrap
    # of all-zero values reports [0, 0]
    exact_hi = 1 - 0.025 ** (1 / 64)
    for solved in (0.0, 1.0):
        recs = [_rec("base", 12, "medium", solved, 0.1, 12.0) for _ in range(64)]
        row = next(r for r in aggregate(recs, {}) if r["bucket"] == "medium")
        width = row["solved_hi"] - row["solved_lo"]
        assert abs(width - exact_hi) < 0.005, row
        assert row["solved_lo"] <= solved <= row["solved_hi"]


def test_aggregate_buckets_and_means():
    timings = {("tuned", "eb", 1): {"tokens": 100, "seconds": 2.0}}
    rows = aggregate(_records(), timings)
    keys = [(r["bucket"], r["steps"]) for r in rows]
    assert keys == [("all", 1), ("all", 2), ("easy", 1), ("easy", 2), ("hard", 1), ("hard", 2)]
    by = {(r["bucket"], r["steps"]): r for r in rows}
    assert by[("all", 1)]["n"] == 4 and by[("all", 1)]["solved"] == pytest.approx(0.25)
    assert by[("all", 2)]["solved"] == pytest.approx(0.75)
    assert by[("easy", 2)]["n"] == 2 and by[("easy", 2)]["solved"] == pytest.approx(0.5)
    assert by[("easy", 1)]["cell_acc"] == pytest.approx(0.55)
    assert by[("all", 1)]["cell_acc"] == pytest.approx(0.65)
    assert by[("hard", 2)]["mean_nfe"] == pytest.approx(2.0)
    assert by[("easy", 1)]["tokens_per_s"] == by[("all", 1)]["tokens_per_s"] == pytest.approx(50.0)
    assert by[("all", 2)]["tokens_per_s"] == 0.0
    assert by[("all", 1)]["steps_to_plateau"] == 2
    assert by[("hard", 2)]["steps_to_plateau"] == 1


def test_steps_to_plateau():
    rows = [{"model": "m", "sampler": "s", "bucket": "all", "steps": st, "solved": v}
            for st, v in zip((1, 2, 4, 8), (0.1, 0.5, 0.78, 0.8))]
    rows += [{"model": "m", "sampler": "s", "bucket": "hard", "steps": st, "solved": 0.0} for st in (1, 2)]
    add_steps_to_plateau(rows)
    assert [r["steps_to_plateau"] for r in rows] == [4, 4, 4, 4, None, None]


def test_format_table_filters_bucket():
    rows = aggregate(_records(), {})
    table = format_table(rows, bucket="easy")
    lines = table.splitlines()
    assert len(lines) == 2 + 2 and all("| easy |" in ln for ln in lines[2:])
    assert "0.500 [" in lines[-1]


def test_write_report(tmp_path):
    rows = aggregate(_records() + [_rec("base", 1, "easy", 0.0, 0.1, 1.0)],
                     {("tuned", "eb", 1): {"tokens": 10, "seconds": 1.0}})
    rows[0]["exact"] = float("nan")
    paths = write_report(tmp_path / "run", rows, {"task": "sudoku", "test_rows": 4})
    assert set(paths) == {"json", "md", "png"} and all(p.exists() for p in paths.values())
    text = paths["json"].read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["meta"]["task"] == "sudoku"
    need = {"model", "bucket", "steps", "solved", "exact", "cell_acc", "parse_fail", "mean_nfe", "tokens_per_s",
            "steps_to_plateau", "solved_lo", "solved_hi", "sampler"}
    assert all(need <= set(r) for r in data["rows"])
    assert data["rows"][0]["exact"] is None
    md = paths["md"].read_text()
    assert "![accuracy vs steps](accuracy_vs_steps.png)" in md and "## Bucket: hard" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in paths["json"].parent.iterdir() if p.name.endswith(".tmp")]


def test_plot_single_bucket(tmp_path):
    rows = aggregate([_rec("m", 4, None, 1.0, 1.0, 4.0)], {})
    plot_accuracy_vs_steps(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_base_rows_of_a_mean_loo_run_are_sampled_as_a_denoiser(tiny, tmp_path, monkeypatch):
    import dgtune.eval.runner as ev
    from dgtune.config import compose
    from dgtune.tasks import build_task

    seen = {}

    def fake_evaluate(model, tokenizer, task, rows, steps, scfg, *args, **kwargs):
        seen[args[2]] = scfg.prediction  # model name ("tuned" / "base") -> what the sampler reads the output as
        return [], {}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    cfg = compose(["recipe=sudoku", "task.template=false", "task.compact_prompt=false", "task.fresh=false", "task.n_test=4", f"eval.out_dir={tmp_path}"])
    model, tok = tiny
    task = build_task(cfg.task)
    ev.run_report(model, tok, task, {"test": []}, cfg, tmp_path, base_model=model)
    assert seen == {"tuned": "mean_loo", "base": "denoiser"}


def test_a_multi_task_report_has_tables_and_curves_per_task(tmp_path):
    """Records of a mixture: rows for all tasks together and for each task (with its buckets), a section per task
    in report.md, a row of panels per task in the plot."""
    recs = []
    for task, sols in (("sort", [1, 1, 0, 1]), ("add", [0, 0, 1, 0])):
        for i, s in enumerate(sols):
            recs.append({**_rec("tuned", 4, "easy" if i < 2 else "hard", float(s), 0.5, 4.0), "task": task})
    rows = aggregate(recs, {})
    by = {(r["task"], r["bucket"]): r for r in rows}
    assert set(by) == {(t, b) for t in ("all", "sort", "add") for b in ("all", "easy", "hard")}
    assert by[("all", "all")]["n"] == 8 and by[("all", "all")]["solved"] == pytest.approx(0.5)
    assert by[("sort", "all")]["solved"] == pytest.approx(0.75) and by[("add", "hard")]["solved"] == pytest.approx(0.5)
    assert [r["task"] for r in rows][:3] == ["all"] * 3  # "all" first
    assert "| task |" in format_table(rows) and "| add |" in format_table(rows)
    paths = write_report(tmp_path, rows, {"task": "mixture"})
    md = paths["md"].read_text()
    assert md.index("## Task: all") < md.index("## Task: add") < md.index("## Task: sort")
    assert md.count("### Bucket: hard") == 3
    single = aggregate([{**r, "task": "sort"} for r in recs], {})  # one task: no per-task rows, as before
    assert {r["task"] for r in single} == {"all"} and len(single) == 3
