"""Canvas templates (givens clamped in the canvas) and verifier-guided renoising in the sampler."""

import pytest
import torch

from dgtune.sampling.sampler import SamplerConfig, sample
from dgtune.tasks.sudoku import SudokuTask


def test_sudoku_guide_flags_exactly_the_clashing_cells(tiny):
    _, tok = tiny
    task = SudokuTask(4, (6, 8), None, canvas_length=24)
    guide = task.make_guide(tok, [{}])
    grid = "1234341221434321"
    ids = torch.tensor([tok(grid, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * 8])
    fixed = torch.ones_like(ids, dtype=torch.bool)
    assert not guide(ids, fixed, torch.arange(1)).any()  # a valid grid has no clash
    bad = ids.clone()
    bad[0, 1] = ids[0, 0]  # 1134 / 3412 / 2143 / 4321: cell 1 clashes with cell 0 (row) and cell 9 (column)
    assert guide(bad, fixed, torch.arange(1))[0].nonzero().flatten().tolist() == [0, 1, 9]
    partly = fixed.clone()
    partly[0, 0] = False  # a cell that is not fixed neither clashes nor is flagged
    assert guide(bad, partly, torch.arange(1))[0].nonzero().flatten().tolist() == [1, 9]


def test_template_tokens_are_clamped_and_guided_sampling_runs(tiny):
    model, tok = tiny
    task = SudokuTask(4, (6, 8), None, canvas_length=24, use_template=True)
    rows = task.build_split("test", 6, seed=0)
    from dgtune.data import prompt_ids

    prompts = torch.tensor([prompt_ids(tok, r["prompt"]) for r in rows])
    template = task.template_tensor(tok, rows)
    assert template.shape == (6, 24) and ((template >= 0).sum(-1) == torch.tensor([r["givens"] for r in rows])).all()
    for strategy in ("entropy_bound", "topk_confidence", "threshold"):
        for guide in (None, task.make_guide(tok, rows)):
            cfg = SamplerConfig(max_steps=6, mode="fast", strategy=strategy)
            out = sample(model, prompts, cfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id, 24,
                         row_seeds=torch.arange(6), template=template, guide=guide)
            is_eos = out.tokens == tok.eos_token_id  # an untrained model may end early: compare before EOS
            before_eos = (torch.cumsum(is_eos.long(), -1) - is_eos.long()) == 0
            known = (template >= 0) & before_eos
            assert known.sum() > 10 and torch.equal(out.tokens[known], template[known]), strategy
            assert (out.nfe >= 1).all() and (out.nfe <= 6).all()


def test_sample_cli_path_samples_as_eval_does_with_the_template(tiny):
    from dgtune.config import compose
    from dgtune.sampling.config import sampler_config
    from dgtune.eval.runner import evaluate
    from dgtune.sample import sample_prompt
    from dgtune.tasks import build_task
    from dgtune.errors import SudokuFormatError

    model, tok = tiny
    cfg = compose(["recipe=sudoku_4x4", "sampler.max_steps=2"])
    task = build_task(cfg.task)
    assert task.use_template
    row = task.build_split("test", 1, 0)[0]
    calls = []

    def spy(*args, **kwargs):  # what the sampler is given and returns
        res = sample(*args, **kwargs)
        calls.append((kwargs.get("template"), res.tokens))
        return res

    old_length = model.config.canvas_length
    model.config.canvas_length = task.canvas_length
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("dgtune.eval.runner.sample", spy)
            rec = sample_prompt(model, tok, task, row["prompt"], cfg)
        ref, _ = evaluate(model, tok, task, [row], [2], sampler_config(cfg, tok), 1, cfg.seed, "tuned")
    finally:
        model.config.canvas_length = old_length
    assert rec["output"] == ref[0]["output"]
    (template, tokens), = calls
    known = template >= 0
    assert known.any() and torch.equal(tokens[known], template[known])  # the givens are clamped
    for bad in (row["prompt"][:-1], row["prompt"].replace("sudoku:", ""), "sudoku:1100" + "0" * 12):
        with pytest.raises(SudokuFormatError):
            task.row_from_prompt(bad)


def test_coloring_guide_holds_one_graph_per_row(tiny):
    """The guide protocol carries the batch's row indices, so rows with different graphs get their own rules
    (before: `guide(tokens, fixed)` had no row data, and only Sudoku, the same rules for every row, had a guide)."""
    from dgtune.tasks.coloring import ColoringTask

    _, tok = tiny
    task = ColoringTask({"v4": {"vertices": 4, "colors": 3}}, use_template=True)
    rows = [task.row_from_prompt("color:3;ab,bc,cd"), task.row_from_prompt("color:3;ac,bd,cd")]
    guide = task.make_guide(tok, rows)
    l = task.canvas_length
    ids = torch.full((2, l), tok.eos_token_id)
    ids[:, :8] = torch.tensor(tok("a1b2c1d2", add_special_tokens=False)["input_ids"])  # path a-b-c-d: proper
    fixed = torch.ones_like(ids, dtype=torch.bool)
    reject = guide(ids, fixed, torch.arange(2))  # [2, l]
    assert not reject[0].any()  # proper for row 0's graph
    assert reject[1].nonzero().flatten().tolist() == [1, 3, 5, 7]  # edges a-c (1 = 1) and b-d (2 = 2) clash in row 1
    # the fast sampler drops finished rows: `rows` then names which batch rows are left
    assert reject[1].tolist() == guide(ids[1:], fixed[1:], torch.tensor([1]))[0].tolist()
    partly = fixed.clone()
    partly[1, 1] = False  # a's colour not fixed yet: only b-d clashes
    assert guide(ids, partly, torch.arange(2))[1].nonzero().flatten().tolist() == [3, 7]
    # before a step chooses: the values a position cannot take, given its fixed neighbours (row 1: a-c, b-d, c-d)
    only_a = torch.zeros_like(fixed)
    only_a[:, 1] = True  # a = 1 fixed
    value_ids, taken = guide.forbidden(ids, only_a, torch.arange(2))  # [k], [2, l, k]

    def forbid(taken, row, pos):
        return sorted(value_ids[taken[row, pos]].tolist())

    one = tok.convert_tokens_to_ids("1")
    assert sorted(value_ids.tolist()) == sorted(tok.convert_tokens_to_ids(str(d)) for d in (1, 2, 3))  # the colours
    assert forbid(taken, 1, 5) == [one]  # c (position 5) is a's neighbour in row 1
    assert forbid(taken, 0, 5) == [] and forbid(taken, 0, 3) == [one]  # in row 0, b is
    assert not taken[:, 1].any()  # a's own colour is not constrained by itself
    # a dead end (all k colours taken by neighbours) forbids nothing rather than every colour (which would push the
    # position to a non-colour token); 4..9 are no colours of a 3-colouring
    star = ColoringTask({"v4": {"vertices": 4, "colors": 3}})
    hub = star.row_from_prompt("color:3;ab,ac,ad")
    g = star.make_guide(tok, [hub])
    ids4 = torch.tensor([tok("a0b1c2d3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    fixed4 = torch.ones_like(ids4, dtype=torch.bool)
    fixed4[0, 1] = False
    value_ids, taken = g.forbidden(ids4, fixed4, torch.arange(1))
    assert forbid(taken, 0, 1) == []
    fixed4[0, 3] = False  # b free again: a may not take 2 or 3 but may take 1
    value_ids, taken = g.forbidden(ids4, fixed4, torch.arange(1))
    assert forbid(taken, 0, 1) == sorted(tok.convert_tokens_to_ids(str(d)) for d in (2, 3))


def test_guided_coloring_eval_runs_per_batch_rows(tiny):
    """`evaluate(..., guided=True)` builds the guide for each batch's rows; guided rows are graded by the rules."""
    from dgtune.eval.runner import evaluate
    from dgtune.tasks.coloring import ColoringTask

    model, tok = tiny
    task = ColoringTask({"v5": {"vertices": 5, "colors": 3}}, use_template=True)
    rows = task.build_split("test", 5, seed=0)
    seen = []
    make = task.make_guide

    def spy(tokenizer, batch_rows):
        seen.append([r["prompt"] for r in batch_rows])
        return make(tokenizer, batch_rows)

    task.make_guide = spy
    cfg = SamplerConfig(max_steps=3, mode="fast", strategy="topk_margin")
    records, _ = evaluate(model, tok, task, rows, [3], cfg, 2, 0, "tuned", guided=True)
    assert sorted(p for batch in seen for p in batch) == sorted(r["prompt"] for r in rows)
    assert max(len(batch) for batch in seen) == 2 and len(records) == 5


def test_forbidden_values_are_never_chosen_and_only_for_their_rows(tiny):
    """A guide's `forbidden` masks the step's choice (top-k strategies) in the rows it names; the other rows sample
    as without a guide. Before: a vetoed value could be drawn again at once, the guide only looked after."""
    model, tok = tiny
    prompts = torch.tensor([tok("ab", add_special_tokens=False)["input_ids"]] * 2)
    cfg = SamplerConfig(max_steps=4, mode="fast", strategy="topk_margin")

    def draw(guide):
        return sample(model, prompts, cfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id, 12,
                      row_seeds=torch.arange(2), guide=guide).tokens

    plain = draw(None)
    x = next(int(t) for t in plain[0] if t not in (tok.pad_token_id, tok.eos_token_id))  # a token row 0 draws

    class OnlyRow0:
        def __call__(self, tokens, fixed, rows):
            return torch.zeros_like(fixed)

        def forbidden(self, tokens, fixed, rows):
            return torch.tensor([x]), (rows == 0)[:, None, None].expand(-1, tokens.shape[1], 1)

    guided = draw(OnlyRow0())
    assert (plain[0] == x).any() and not (guided[0] == x).any()
    assert torch.equal(guided[1], plain[1])
