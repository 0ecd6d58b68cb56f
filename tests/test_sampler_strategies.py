"""The fast sampler: every strategy, committed-token invariants, [MASK] noise, batch invariance, config wiring."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from dgtune.sampling import fast, rng, strategies
from dgtune.sampling.sampler import SamplerConfig, sample, token_entropy, uses_reference
from dgtune.sampling.stats import step_stats_torch

MASK_ID = 3  # the tiny tokenizer's <mask>
ALL = ["entropy_bound", "topk_confidence", "topk_margin", "topk_entropy", "topk_random", "threshold"]


def _prompts(b, seed=0):
    return torch.randint(7, 40, (b, 10), generator=torch.Generator().manual_seed(seed))


def _sharpen(model, factor):
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)


def _record(monkeypatch):
    """Record (canvas in, committed in, steps_left, canvas out, committed out, output) of every strategy step."""
    calls = []

    def wrapped(cfg, st, canvas, committed, steps_left, keys, vocab_size, mask_id, guide=None):
        nxt, com, out, drawn = strategies.strategy_step(cfg, st, canvas, committed, steps_left, keys, vocab_size,
                                                        mask_id, guide)
        calls.append((canvas.clone(), committed.clone(), steps_left, nxt.clone(), com.clone(), out.clone()))
        return nxt, com, out, drawn

    monkeypatch.setattr(fast, "strategy_step", wrapped)
    return calls


def _record_logits(monkeypatch) -> list:
    """Record the logits [b * l, v] every fast-sampler step computes its statistics from."""
    seen = []
    orig = fast.step_stats

    def spy(logits, t, **kw):
        seen.append(logits.clone())
        return orig(logits, t, **kw)

    monkeypatch.setattr(fast, "step_stats", spy)
    return seen


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("noise", ["uniform", "mask"])
def test_strategy_shapes_nfe_and_commits(tiny, monkeypatch, strategy, noise):
    model, tok = tiny
    calls = _record(monkeypatch)
    steps = 5
    cfg = SamplerConfig(strategy=strategy, mode="fast", noise=noise, mask_token_id=MASK_ID, max_steps=steps,
                        sync_every=1000)  # no retiring here: every call sees the whole batch
    res = sample(model, _prompts(3), cfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id)
    assert res.tokens.shape == (3, model.config.canvas_length) and res.nfe.shape == (3,)
    assert ((res.nfe >= 1) & (res.nfe <= steps)).all()
    if strategy.startswith("topk"):
        assert (res.nfe == steps).all()
    if noise == "mask":
        assert (calls[0][0] == MASK_ID).all()  # the canvas starts all [MASK]
        assert not (res.tokens == MASK_ID).any()  # [MASK] is never predicted
    for canvas, committed, steps_left, nxt, com, out in calls:
        assert (com | ~committed).all()  # commitments are never undone
        assert torch.equal(nxt[committed], canvas[committed])  # ... and committed tokens never change
        assert torch.equal(out[com], nxt[com])  # the output keeps the committed tokens
        if noise == "mask" and strategy != "entropy_bound":  # (entropy_bound feeds its accepted samples back)
            assert (nxt[~com] == MASK_ID).all()
        new = (com & ~committed).sum(-1)
        free = (~committed).sum(-1)
        if strategy.startswith("topk"):
            assert torch.equal(new, (free + steps_left - 1) // steps_left)  # ceil(remaining / steps left)
            if steps_left == 1:
                assert com.all()  # everything committed by the last step
        if strategy == "threshold":
            assert (new >= (free > 0).long()).all()  # at least one per step
        if strategy == "entropy_bound":
            assert not com.any()


def test_threshold_commits_confident_positions():
    cfg = SamplerConfig(strategy="threshold", threshold=0.5)
    p = torch.tensor([[0.9, 0.2, 0.6, 0.95]])
    committed = torch.tensor([[False, False, False, True]])
    st = strategies_stats(p)
    keys = {"renoise": torch.zeros(1, 4, dtype=torch.long), "score": torch.zeros(1, 4, dtype=torch.long)}
    canvas = torch.tensor([[9, 9, 9, 5]])
    nxt, com, out, _ = strategies.strategy_step(cfg, st, canvas, committed, 3, keys, 60, MASK_ID)
    assert com.tolist() == [[True, False, True, True]]
    assert nxt.tolist() == [[11, MASK_ID, 11, 5]] and out.tolist() == [[11, 22, 11, 5]]
    p_low = torch.tensor([[0.1, 0.3, 0.2, 0.95]])
    _, com, _, _ = strategies.strategy_step(cfg, strategies_stats(p_low), canvas, committed, 3, keys, 60, MASK_ID)
    assert com.tolist() == [[False, True, False, True]]  # none above tau: the most confident free one


def strategies_stats(max_prob):
    """Fake StepStats [1, l]: sample 11 everywhere, argmax 22 everywhere."""
    from dgtune.sampling.stats import StepStats

    shape = max_prob.shape
    return StepStats(torch.zeros(shape), max_prob, torch.full(shape, 22), torch.zeros(shape), torch.full(shape, 11))


def test_topk_selection_ranks():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    free = torch.tensor([[True, False, True, True, True]])
    sel = strategies.select_topk(scores, free, torch.tensor([2]))
    assert sel.tolist() == [[False, False, True, True, False]]


def test_step_stats_torch_matches_definitions():
    logits = torch.randn(6, 4, 30, generator=torch.Generator().manual_seed(0)) * 3
    keys = rng.position_keys(rng.seed_keys(torch.arange(6)), 4).view(-1)
    st = step_stats_torch(logits.view(-1, 30), 0.6, noise_keys=keys)
    z = logits.view(-1, 30) / 0.6
    p = z.softmax(-1)
    top = p.topk(2).values
    torch.testing.assert_close(st.entropy, token_entropy(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.max_prob, top[:, 0])
    torch.testing.assert_close(st.margin, top[:, 0] - top[:, 1], atol=1e-6, rtol=1e-5)
    assert torch.equal(st.argmax, z.argmax(-1)) and st.sample.shape == (24,)
    u = rng.uniform(torch.arange(20000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("strategy,dtype", [("entropy_bound", "auto"), ("threshold", "auto"),
                                            ("topk_random", "auto"), ("entropy_bound", "bfloat16")])
def test_batch_invariance(tiny, strategy, dtype):
    """A row's tokens and NFE depend on its seed only, not on the batch (64 rows vs alone), with retiring rows;
    also with bf16 decoder matmuls."""
    model, tok = tiny
    prompts, seeds = _prompts(64, seed=1), torch.arange(64) * 7 + 1
    cfg = SamplerConfig(strategy=strategy, mode="fast", max_steps=8, decoder_dtype=dtype)
    _sharpen(model, 30.0)  # confident rows stop at different steps
    try:
        big = sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds)
        for i in (0, 29, 63):
            one = sample(model, prompts[i:i + 1], cfg, None, tok.eos_token_id, tok.pad_token_id,
                         row_seeds=seeds[i:i + 1])
            assert torch.equal(one.tokens[0], big.tokens[i]) and one.nfe[0] == big.nfe[i], i
        again = sample(model, prompts[:8], cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds[:8])
    finally:
        _sharpen(model, 1 / 30.0)
    assert torch.equal(again.tokens, big.tokens[:8])
    if strategy != "topk_random":
        assert big.nfe.min() < big.nfe.max()  # rows did finish at different steps


def test_fast_equals_reference_when_confident(tiny, monkeypatch):
    """With a decoder that is certain regardless of the canvas, both modes stop after 2 steps (stable + confident)
    with the argmax canvas: same tokens, same NFE."""
    model, tok = tiny
    l, v = model.config.canvas_length, model.config.text_config.vocab_size
    target = torch.randint(7, v, (3, l), generator=torch.Generator().manual_seed(5))
    target[:, -3] = tok.eos_token_id

    def fake_decode(model, canvas, cache, self_conditioning_logits=None, **kw):
        idx = torch.arange(canvas.shape[0])  # fast mode may call with fewer rows; all rows share the target here
        return torch.nn.functional.one_hot(target[idx % 3], v).float() * 40.0

    import dgtune.sampling.reference as reference

    monkeypatch.setattr(reference, "decode", fake_decode)
    monkeypatch.setattr(fast, "decode", fake_decode)
    prompts = _prompts(3)
    ref = sample(model, prompts, SamplerConfig(max_steps=12, mode="reference"), torch.Generator().manual_seed(0), 1, 0)
    fst = sample(model, prompts, SamplerConfig(max_steps=12, mode="fast", decoder="transformers"),
                 torch.Generator().manual_seed(0), 1, 0)
    assert torch.equal(ref.tokens, fst.tokens) and torch.equal(ref.nfe, fst.nfe)
    assert (fst.nfe == 2).all() and (fst.tokens[:, -2:] == 0).all()


def test_sampler_yamls_and_group_override(tmp_path):
    """Every sampler YAML composes on the schema; the eval / sample commands compose overrides onto a saved run's
    config with Hydra (`compose_run`): a group choice replaces the group, keys a run saved before they existed take
    their defaults, a typo or a bad value is a ConfigError naming it."""
    from dgtune.config import compose, config_dir
    from dgtune.errors import ConfigError
    from dgtune.eval.runs import compose_run
    from dgtune.sampling.config import sampler_config

    names = sorted(p.stem for p in (config_dir() / "sampler").glob("*.yaml"))
    assert set(ALL) <= set(names)
    for name in names:
        node = compose([f"sampler={name}"]).sampler
        assert node.name == name
        strategies.check_strategy(sampler_config(OmegaConf.create({"sampler": node})))
    saved = OmegaConf.create({"seed": 0, "sampler": {"name": "entropy_bound", "strategy": "entropy_bound",
                                                     "max_steps": 48, "entropy_bound": 0.2}})  # an old run's config
    cfg = compose_run(saved, ["sampler.max_steps=12", "sampler=topk_confidence"])
    assert cfg.sampler.name == "topk_confidence" and cfg.sampler.max_steps == 12
    assert cfg.sampler.entropy_bound == 0.1 and cfg.seed == 0  # the new group's values (schema defaults), not the saved ones
    assert sampler_config(cfg).strategy == "topk_confidence"
    cfg = compose_run(saved, ["sampler.mode=reference"])  # a field the saved config predates
    assert sampler_config(cfg).mode == "reference" and sampler_config(saved).mode == "fast"
    assert cfg.sampler.entropy_bound == 0.2 and cfg.sampler.max_steps == 48  # the saved values stay
    assert compose_run(saved, ["eval.steps=[1,4]"]).eval.steps == [1, 4]
    with pytest.raises(ConfigError, match="topk_confidence"):
        compose_run(saved, ["sampler=nope"])
    with pytest.raises(ConfigError, match="sampler.nope"):
        compose_run(saved, ["sampler.nope=1"])
    with pytest.raises(ConfigError, match="sampler.max_steps"):
        compose_run(saved, ["sampler=threshold", "sampler.max_steps=abc"])
    assert math.isclose(sampler_config(compose_run(saved, ["sampler=threshold"])).threshold, 0.9)


def test_multi_canvas_fast(tiny):
    """Rows without EOS get a second canvas (cache sliced to them, canvas encoded); still batch invariant."""
    model, tok = tiny
    prompts, seeds = _prompts(6, seed=2), torch.arange(6) + 100
    cfg = SamplerConfig(mode="fast", max_steps=3, max_canvases=3)
    big = sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds)
    l = model.config.canvas_length
    assert big.tokens.shape[1] in (l, 2 * l, 3 * l) and (big.nfe % 3 == 0).all()
    assert big.nfe.min() < big.nfe.max()  # some rows stopped after an EOS canvas, the others went on
    is_eos = big.tokens == tok.eos_token_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    assert (big.tokens[after] == tok.pad_token_id).all()
    for i in (0, 5):
        one = sample(model, prompts[i:i + 1], cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds[i:i + 1])
        w = one.tokens.shape[1]
        assert torch.equal(one.tokens[0], big.tokens[i, :w]) and (big.tokens[i, w:] == tok.pad_token_id).all()
        assert one.nfe[0] == big.nfe[i]


def test_mean_loo_prediction_is_converted_at_the_canvas_noise_level(tiny, monkeypatch):
    """prediction="mean_loo": the decoder output is turned into the denoiser posterior with t = share of noise
    positions (1 on the first step: all noise, so the leave-one-out logits pass unchanged)."""
    from omegaconf import OmegaConf

    from dgtune.diffusion.objective import loo_to_denoiser_logits
    from dgtune.sampling.config import sampler_config
    from dgtune.sampling import sampler as sampler_mod

    model, tok = tiny
    seen = _record_logits(monkeypatch)
    prompts, seeds = _prompts(2), torch.tensor([3, 4])
    outs = {}
    for pred in ("denoiser", "mean_loo"):
        seen.clear()
        cfg = SamplerConfig(mode="fast", max_steps=3, prediction=pred, sync_every=1000)
        outs[pred] = (sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds),
                      [x.clone() for x in seen])
    (_, den), (_, loo) = outs["denoiser"], outs["mean_loo"]
    torch.testing.assert_close(loo[0].log_softmax(-1), den[0].log_softmax(-1))  # step 1: t = 1, q(y | x) is flat
    assert not torch.allclose(loo[1].log_softmax(-1), den[1].log_softmax(-1))  # later: kept tokens add evidence
    assert not uses_reference(SamplerConfig(mode="reference", prediction="mean_loo"))
    with pytest.raises(ValueError, match="prediction"):
        uses_reference(SamplerConfig(mode="reference", prediction="x0"))
    cfg = OmegaConf.create({"sampler": {"name": "entropy_bound", "strategy": "entropy_bound"},
                            "objective": {"prediction": "mean_loo"}})
    assert sampler_config(cfg).prediction == "mean_loo"
    v = 5
    t1 = loo_to_denoiser_logits(torch.zeros(1, 1, v), torch.tensor([[2]]), torch.tensor([1.0]))
    assert torch.allclose(t1.softmax(-1), torch.full((1, 1, v), 1 / v))


def test_batch_invariance_bf16_decoder_on_uncertain_logits(tiny):
    """bf16 decoder matmuls on an unsharpened model (samples are sensitive to last-bit differences): rows alone equal
    the same rows in a batch of 64. transformers' fp32 encoder differs in the last bit between batch sizes; the fused
    decoder rounds the prompt cache to bf16, which keeps bf16 casts further on from amplifying that."""
    from dgtune.data import prompt_ids
    from dgtune.tasks.sudoku import SudokuTask

    model, tok = tiny
    rows = SudokuTask(9, (30, 30), {"medium": [30, 39]}).build_split("test", 64, 0)  # equal-length 9x9 prompts
    prompts, seeds = torch.tensor([prompt_ids(tok, r["prompt"]) for r in rows]), torch.arange(64) * 5 + 2
    cfg = SamplerConfig(mode="fast", max_steps=12, decoder_dtype="bfloat16")
    big = sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds)
    for i in range(16):
        one = sample(model, prompts[i:i + 1], cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds[i:i + 1])
        assert torch.equal(one.tokens[0], big.tokens[i]), i


def test_mean_loo_noise_level_counts_only_free_positions_with_a_template(tiny, monkeypatch):
    """With a canvas template, t is the share of the free (non-template) positions that are noise, as in training:
    1 on the first step, where every free position is a random token (not 1 - known / l)."""
    model, tok = tiny
    levels = []
    orig = fast.loo_to_denoiser_logits

    def spy(logits, noisy, t):
        levels.append(t.clone())
        return orig(logits, noisy, t)

    monkeypatch.setattr(fast, "loo_to_denoiser_logits", spy)
    l = model.config.canvas_length
    template = torch.full((2, l), -1)
    template[0, :8] = 9  # row 0: 8 known positions, row 1: none
    template[1, 3] = 10  # row 1: one known position
    cfg = SamplerConfig(mode="fast", max_steps=3, prediction="mean_loo", sync_every=1000)
    sample(model, _prompts(2), cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=torch.tensor([3, 4]),
           template=template)
    torch.testing.assert_close(levels[0], torch.ones(2))
    assert all(((t > 0) & (t <= 1)).all() for t in levels)


@pytest.mark.parametrize("decoder", ["fused", "transformers"])
def test_no_self_conditioning_for_a_model_trained_without_it(tiny, monkeypatch, decoder):
    """objective.self_cond_p=0: the model never saw the previous step's logits as input in training, so the sampler
    must not feed them (it did, and a 9x9 Sudoku adapter's blank-cell accuracy at 12 steps fell from 0.500 to 0.353,
    below its own one-step 0.467). With self-conditioning off every step decodes its canvas alone: the logits of
    step 2 equal a fresh decode of that step's canvas with no self-conditioning input."""
    from dgtune.diffusion.model_calls import decode, encode
    from dgtune.sampling.config import sampler_config
    from dgtune.sampling import fused_decoder

    model, tok = tiny
    cfg = OmegaConf.create({"sampler": {"name": "topk_margin_mask", "strategy": "topk_margin", "noise": "mask"},
                            "objective": {"prediction": "denoiser", "self_cond_p": 0.0}})
    assert sampler_config(cfg, tok).self_conditioning is False
    cfg.objective.self_cond_p = 0.5
    assert sampler_config(cfg, tok).self_conditioning is True
    assert not uses_reference(SamplerConfig(mode="reference", self_conditioning=False))

    seen, canvases = _record_logits(monkeypatch), _record(monkeypatch)
    prompts, seeds = _prompts(2), torch.tensor([5, 6])
    for sc in (True, False):
        seen.clear(), canvases.clear()
        scfg = SamplerConfig(mode="fast", strategy="topk_margin", noise="mask", mask_token_id=MASK_ID, commit="argmax",
                             max_steps=3, sync_every=1000, decoder=decoder, self_conditioning=sc)
        sample(model, prompts, scfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds)
        cache, _ = encode(model, prompts)
        p = prompts.shape[1]
        pos = torch.arange(p, p + model.config.canvas_length)[None]
        plain = decode(model, canvases[1][0], cache, decoder_position_ids=pos)  # step 2's canvas, no SC input
        plain[..., MASK_ID] = float("-inf")
        step2 = seen[1].view_as(plain)
        same = torch.allclose(step2, plain, atol=1e-4, rtol=1e-4)
        assert same is (not sc), f"self_conditioning={sc}: step-2 logits {'differ from' if same else 'equal'} a plain decode"
