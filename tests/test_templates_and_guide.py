"""Canvas templates (givens clamped in the canvas) and verifier-guided renoising in the sampler."""

import torch

from dgtune.sampling.sampler import SamplerConfig, sample
from dgtune.tasks.sudoku_task import SudokuTask


def test_sudoku_guide_flags_exactly_the_clashing_cells(tiny):
    _, tok = tiny
    task = SudokuTask(4, (6, 8), None, canvas_length=24)
    guide = task.make_guide(tok)
    grid = "1234341221434321"
    ids = torch.tensor([tok(grid, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * 8])
    fixed = torch.ones_like(ids, dtype=torch.bool)
    assert not guide(ids, fixed).any()  # a valid grid has no clash
    bad = ids.clone()
    bad[0, 1] = ids[0, 0]  # 1134 / 3412 / 2143 / 4321: cell 1 clashes with cell 0 (row) and cell 9 (column)
    assert guide(bad, fixed)[0].nonzero().flatten().tolist() == [0, 1, 9]
    partly = fixed.clone()
    partly[0, 0] = False  # a cell that is not fixed neither clashes nor is flagged
    assert guide(bad, partly)[0].nonzero().flatten().tolist() == [1, 9]


def test_template_tokens_are_clamped_and_guided_sampling_runs(tiny):
    model, tok = tiny
    task = SudokuTask(4, (6, 8), None, canvas_length=24, use_template=True)
    rows = task.build_split("test", 6, seed=0)
    from dgtune.data import prompt_ids

    prompts = torch.tensor([prompt_ids(tok, r["prompt"]) for r in rows])
    template = task.template_tensor(tok, rows)
    assert template.shape == (6, 24) and ((template >= 0).sum(-1) == torch.tensor([r["givens"] for r in rows])).all()
    for strategy in ("entropy_bound", "topk_confidence", "threshold"):
        for guide in (None, task.make_guide(tok)):
            cfg = SamplerConfig(max_steps=6, mode="fast", strategy=strategy)
            out = sample(model, prompts, cfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id, 24,
                         row_seeds=torch.arange(6), template=template, guide=guide)
            is_eos = out.tokens == tok.eos_token_id  # an untrained model may end early: compare before EOS
            before_eos = (torch.cumsum(is_eos.long(), -1) - is_eos.long()) == 0
            known = (template >= 0) & before_eos
            assert known.sum() > 10 and torch.equal(out.tokens[known], template[known]), strategy
            assert (out.nfe >= 1).all() and (out.nfe <= 6).all()
