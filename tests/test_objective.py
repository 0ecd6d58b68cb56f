"""The denoising loss against an independent, plain computation through the model's own forward()."""

import pytest
import torch
import torch.nn.functional as F

from dgtune.data import collate_train, encode_rows
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.objective import (
    ObjectiveConfig,
    corrupt_further,
    corrupt_masked,
    corrupt_uniform,
    sample_noise_level,
)


def _batch(tok, canvas_length):
    rows = [{"task": "t", "prompt": "sort:3141", "response": "1134"}, {"task": "t", "prompt": "rev:12345", "response": "54321"},
            {"task": "t", "prompt": "add:7+8", "response": "15"}]
    return collate_train(encode_rows(tok, rows, canvas_length), tok.pad_token_id)


def _reference_loss(model, batch, seed, vocab, p_sc=0.5, eps=1e-4):
    """TRL-style: full model.forward() twice, draws replayed from the same generator in the same order."""
    g = torch.Generator().manual_seed(seed)
    ids, am, plen, clean = batch["input_ids"], batch["attention_mask"], batch["prompt_len"], batch["canvas"]
    b, s = ids.shape
    l = clean.shape[1]
    t = eps + (1 - 2 * eps) * torch.rand(b, generator=g)
    corrupt = torch.rand(b, l, generator=g) < t[:, None]
    noisy = torch.where(corrupt, torch.randint(0, vocab, (b, l), generator=g), clean)
    gate = torch.rand(b, generator=g) < p_sc
    kw = dict(input_ids=ids, attention_mask=am, decoder_input_ids=noisy,
              decoder_attention_mask=torch.cat([(torch.arange(s)[None] < plen[:, None]).long(), torch.ones(b, l, dtype=torch.long)], 1),
              decoder_position_ids=plen[:, None] + torch.arange(l)[None])
    with torch.no_grad():
        first = model(**kw).logits
    out = model(**kw, self_conditioning_logits=first, self_conditioning_mask=gate)
    diff = F.cross_entropy(out.logits.flatten(0, 1), clean.flatten())
    cap = model.config.text_config.final_logit_softcapping
    enc = torch.tanh(model.lm_head(out.encoder_last_hidden_state).float() / cap) * cap
    valid = am[:, :-1].bool() & am[:, 1:].bool()
    ar = F.cross_entropy(enc[:, :-1].flatten(0, 1), torch.where(valid, ids[:, 1:], -100).flatten(), ignore_index=-100)
    return diff, ar


def test_loss_matches_plain_forward(tiny):
    model, tok = tiny
    batch = _batch(tok, model.config.canvas_length)
    vocab = model.config.text_config.vocab_size
    for seed in (0, 1, 2):
        ours = denoising_loss(model, batch, ObjectiveConfig(), torch.Generator().manual_seed(seed), vocab, tok.mask_token_id)
        diff, ar = _reference_loss(model, batch, seed, vocab)
        torch.testing.assert_close(ours["diffusion_loss"], diff.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours["ar_loss"], ar.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours["loss"].detach(), (diff + ar).detach(), rtol=1e-5, atol=1e-5)


def test_loss_has_gradients_and_prompt_is_clean(tiny):
    model, tok = tiny
    batch = _batch(tok, model.config.canvas_length)
    out = denoising_loss(model, batch, ObjectiveConfig(), torch.Generator().manual_seed(0), model.config.text_config.vocab_size, 3)
    out["loss"].backward()
    assert model.model.decoder.self_conditioning.gate_proj.weight.grad is not None
    model.zero_grad()


def test_noise_level_range_and_corruption_rate():
    g = torch.Generator().manual_seed(0)
    t = sample_noise_level(20000, 1e-4, g)
    assert float(t.min()) >= 1e-4 and float(t.max()) <= 1 - 1e-4
    assert abs(float(t.mean()) - 0.5) < 0.01
    clean = torch.zeros(4, 5000, dtype=torch.long)
    tt = torch.tensor([0.1, 0.5, 0.9, 0.3])
    noisy, corrupted = corrupt_uniform(clean, tt, 50, g)
    rates = corrupted.float().mean(1)
    assert torch.allclose(rates, tt, atol=0.03)
    # uniform noise draws any token: 1/50 of corrupted positions keep the clean id by chance
    assert ((noisy != 0).float().mean(1) < rates).all()
    keep = torch.zeros(4, 5000, dtype=torch.bool)
    keep[:, :100] = True
    noisy, corrupted = corrupt_masked(clean, tt, 3, g, keep)
    assert not corrupted[:, :100].any() and (noisy[corrupted] == 3).all() and (noisy[~corrupted] == 0).all()


def test_noise_level_power_favours_high_noise():
    # t = eps + (1 - 2 eps) u^p: E[u^p] = 1 / (p + 1), P(t > 0.5) = 1 - 0.5^(1/p)
    t = sample_noise_level(20000, 1e-4, torch.Generator().manual_seed(0), power=0.5)
    assert float(t.min()) >= 1e-4 and float(t.max()) <= 1 - 1e-4
    assert abs(float(t.mean()) - 2 / 3) < 0.01
    assert abs(float((t > 0.5).float().mean()) - 0.75) < 0.01
    # power 1 (the default) is exactly the released U(eps, 1 - eps) on the same draws
    u = torch.rand(100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_noise_level(100, 1e-4, torch.Generator().manual_seed(1)), 1e-4 + (1 - 2e-4) * u)
    with pytest.raises(ValueError, match="t_power"):
        sample_noise_level(4, 1e-4, torch.Generator().manual_seed(0), power=0.0)


def test_further_corruption_is_a_superset_at_the_higher_level():
    g = torch.Generator().manual_seed(0)
    clean = torch.zeros(3, 6000, dtype=torch.long)
    keep = torch.zeros(3, 6000, dtype=torch.bool)
    keep[:, :200] = True
    t, t_more = torch.tensor([0.1, 0.4, 0.7]), torch.tensor([0.35, 0.4, 0.95])
    noisy, corrupted = corrupt_masked(clean, t, 3, g, keep)
    more, corrupted_more = corrupt_further(noisy, corrupted, t, t_more, torch.full_like(clean, 3), g, keep)
    assert (corrupted_more | ~corrupted).all() and not corrupted_more[:, :200].any()  # superset, keep untouched
    assert torch.equal(more[corrupted], noisy[corrupted]) and (more[corrupted_more] == 3).all()
    assert (more[~corrupted_more] == 0).all()
    free = ~keep
    rates = (corrupted_more & free).float().sum(1) / free.float().sum(1)
    assert torch.allclose(rates, t_more, atol=0.03)
    assert torch.equal(corrupted_more[1], corrupted[1])  # t_more == t: nothing added


def test_noisier_self_conditioning_changes_only_the_conditioning_pass(tiny):
    model, tok = tiny
    batch = _batch(tok, model.config.canvas_length)
    v = model.config.text_config.vocab_size
    no_sc = ObjectiveConfig(self_cond_p=0.0)
    base = denoising_loss(model, batch, no_sc, torch.Generator().manual_seed(0), v, 3)["loss"]
    gap = denoising_loss(model, batch, ObjectiveConfig(self_cond_p=0.0, sc_noise_gap=0.3),
                         torch.Generator().manual_seed(0), v, 3)["loss"]
    assert torch.equal(base, gap)  # without self-conditioning the gap draws nothing and changes nothing
    same = denoising_loss(model, batch, ObjectiveConfig(self_cond_p=1.0), torch.Generator().manual_seed(0), v, 3)
    noisier = denoising_loss(model, batch, ObjectiveConfig(self_cond_p=1.0, sc_noise_gap=0.3),
                             torch.Generator().manual_seed(0), v, 3)
    assert not torch.equal(same["loss"], noisier["loss"])


def test_without_ar_loss_only_prompts_are_encoded_and_loss_is_unchanged(tiny):
    model, tok = tiny
    batch = _batch(tok, model.config.canvas_length)
    vocab = model.config.text_config.vocab_size
    ours = denoising_loss(model, batch, ObjectiveConfig(ar_weight=0.0), torch.Generator().manual_seed(5), vocab, 3)
    diff, _ = _reference_loss(model, batch, 5, vocab)
    assert "ar_loss" not in ours
    torch.testing.assert_close(ours["loss"].detach(), diff.detach(), rtol=1e-5, atol=1e-5)


def test_mean_loo_posterior_and_loss(tiny):
    from dgtune.diffusion.objective import loo_to_denoiser_logits

    # posterior in probability space, written out: p(x) = pi(x) q(y|x) / sum_x' pi(x') q(y|x')
    g = torch.Generator().manual_seed(0)
    loo = torch.randn(2, 3, 5, generator=g)
    noisy = torch.tensor([[0, 4, 2], [1, 1, 3]])
    t = torch.tensor([0.2, 0.9])
    pi = loo.softmax(-1)
    q = torch.stack([torch.stack([torch.tensor([(1 - t[b]) * (x == noisy[b, i]) + t[b] / 5 for x in range(5)])
                                  for i in range(3)]) for b in range(2)])
    expected = pi * q / (pi * q).sum(-1, keepdim=True)
    torch.testing.assert_close(loo_to_denoiser_logits(loo, noisy, t).softmax(-1), expected)

    # the training loss with prediction=mean_loo is the CE of that posterior (same draws as the released loss)
    model, tok = tiny
    batch = _batch(tok, model.config.canvas_length)
    vocab = model.config.text_config.vocab_size
    base = denoising_loss(model, batch, ObjectiveConfig(ar_weight=0.0), torch.Generator().manual_seed(3), vocab, None)
    loo_loss = denoising_loss(model, batch, ObjectiveConfig(ar_weight=0.0, prediction="mean_loo"),
                              torch.Generator().manual_seed(3), vocab, None)
    assert torch.isfinite(loo_loss["loss"]) and not torch.isclose(loo_loss["loss"], base["loss"])
    # the observed token adds evidence (kept with prob. 1 - t): for this random model the CE drops
    assert float(loo_loss["loss"]) < float(base["loss"])
    try:
        denoising_loss(model, batch, ObjectiveConfig(kind="masked", prediction="mean_loo"),
                       torch.Generator().manual_seed(3), vocab, tok.mask_token_id)
    except ValueError as e:
        assert "mean_loo" in str(e)
    else:
        raise AssertionError("mean_loo with masked noise must be rejected")


def test_masked_loss_floors_the_weight_and_normalises_per_example():
    from dgtune.diffusion.objective import masked_canvas_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 9, generator=g)
    target = torch.randint(0, 9, (2, 6), generator=g)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(2, 6)
    corrupted = torch.ones(2, 6, dtype=torch.bool)
    free = torch.tensor([[1.0] * 6, [1.0, 1.0, 0, 0, 0, 0]])  # a template leaves 6 and 2 free positions
    t = torch.tensor([0.5, 0.25])
    expected = ((ce[0] / 0.5).sum() / 6 + (ce[1, :2] / 0.25).sum() / 2) / 2  # each example's mean, then the mean
    torch.testing.assert_close(masked_canvas_loss(logits, target, corrupted, t, free), expected)
    # at t = eps = 1e-4 the weight is floored at 1 / 1e-3, not 1e4
    tiny_t = torch.tensor([1e-4, 1e-4])
    torch.testing.assert_close(masked_canvas_loss(logits, target, corrupted, tiny_t, None), ce.mean() / 1e-3)
    torch.testing.assert_close(masked_canvas_loss(logits, target, corrupted, tiny_t, None, t_min=1e-4),
                               ce.mean() / 1e-4)


def test_mean_loo_self_conditions_on_the_converted_posterior(tiny):
    """prediction=mean_loo: the graded pass is conditioned on the denoiser posterior of the first pass (what the
    sampler feeds back, before its temperature), not on the raw leave-one-out logits."""
    from dgtune.diffusion.objective import loo_to_denoiser_logits

    model, tok = tiny
    batch = _batch(tok, model.config.canvas_length)
    vocab = model.config.text_config.vocab_size
    ours = denoising_loss(model, batch, ObjectiveConfig(ar_weight=0.0, prediction="mean_loo", self_cond_p=1.0),
                          torch.Generator().manual_seed(4), vocab, None)
    g = torch.Generator().manual_seed(4)  # the draws of denoising_loss, in its order
    ids, am, plen, clean = batch["input_ids"], batch["attention_mask"], batch["prompt_len"], batch["canvas"]
    b, s = ids.shape
    l = clean.shape[1]
    t = 1e-4 + (1 - 2e-4) * torch.rand(b, generator=g)
    corrupt = torch.rand(b, l, generator=g) < t[:, None]
    noisy = torch.where(corrupt, torch.randint(0, vocab, (b, l), generator=g), clean)
    kw = dict(input_ids=ids, attention_mask=am, decoder_input_ids=noisy,
              decoder_attention_mask=torch.cat([(torch.arange(s)[None] < plen[:, None]).long(), torch.ones(b, l, dtype=torch.long)], 1),
              decoder_position_ids=plen[:, None] + torch.arange(l)[None])
    with torch.no_grad():
        first = loo_to_denoiser_logits(model(**kw).logits, noisy, t)
    out = model(**kw, self_conditioning_logits=first, self_conditioning_mask=torch.ones(b, dtype=torch.bool))
    expected = F.cross_entropy(loo_to_denoiser_logits(out.logits, noisy, t).flatten(0, 1), clean.flatten())
    torch.testing.assert_close(ours["loss"].detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def _four_rows(tok, canvas_length):
    """Four rows with different prompt lengths (AR pairs) and a template on two (free positions 12, 12, 8, 4)."""
    rows = [{"task": "t", "prompt": "sort:3141", "response": "1134"}, {"task": "t", "prompt": "rev:12345678", "response": "54321"},
            {"task": "t", "prompt": "add:7+8", "response": "15"}, {"task": "t", "prompt": "x", "response": "9"}]
    batch = collate_train(encode_rows(tok, rows, canvas_length), tok.pad_token_id)
    keep = torch.zeros_like(batch["canvas"], dtype=torch.bool)
    keep[2, :4], keep[3, :8] = True, True
    batch["canvas_keep"] = keep
    return batch


@pytest.mark.parametrize("family,objective", [("dg", "released"), ("dg", "masked"), ("dg", "chunked"),
                                              ("dream", "dream"), ("sdar", "sdar"), ("llada", "llada")])
def test_process_slices_share_the_global_batch_loss(tiny, family, objective):
    """`rows` (this process' slice of the global batch): with N processes each loss is N x its rows' share of the
    global loss, so their mean (what DDP's gradient average takes) equals the loss of one process with the whole
    batch, for every noise law, also when the slices hold different numbers of free positions, masked positions
    and prompt tokens (a template on two rows, prompts of different lengths) - the flat, Dream and SDAR laws
    normalise over the batch, the AR co-loss over its token pairs. Before, each process normalised by its own
    counts. Slices of unequal sizes (rft's) hold too."""
    from dgtune.config import compose

    if family == "dg":
        model, tok = tiny
    elif family == "dream":
        from dgtune.models.tiny_dream import build_tiny_dream

        model, tok = build_tiny_dream(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    elif family == "sdar":
        from dgtune.models.tiny_sdar import build_tiny_sdar

        model, tok = build_tiny_sdar(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    else:
        from dgtune.models.tiny_llada import build_tiny_llada

        model, tok = build_tiny_llada(seed=0, d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=64)
    name = "released" if objective == "chunked" else objective
    cfg = ObjectiveConfig(**{k: v for k, v in compose([f"objective={name}"]).objective.items()})
    if objective == "chunked":
        cfg.loss_chunk = 16
    vocab = model.config.text_config.vocab_size if family == "dg" else model.config.vocab_size
    batch = _four_rows(tok, 12)

    def loss(rows=None, processes=1):
        with torch.no_grad():
            return denoising_loss(model, batch, cfg, torch.Generator().manual_seed(3), vocab, tok.mask_token_id,
                                  rows=rows, processes=processes)["loss"]

    whole = loss()
    halves = (loss(slice(0, 2), 2) + loss(slice(2, 4), 2)) / 2
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-6)
    uneven = (loss(slice(0, 1), 2) + loss(slice(1, 4), 2)) / 2
    torch.testing.assert_close(uneven, whole, rtol=1e-5, atol=1e-6)
