"""The dgtune sampler reproduces transformers' DiffusionGemma generate() token for token."""

import contextlib
import copy

import pytest
import torch

from dgtune.sampling.sampler import SamplerConfig, entropy_bound_accept, sample, token_entropy


@contextlib.contextmanager
def sharpened(model, factor, eos_id=None, eos_factor=1.0):
    """LM head (tied to the embeddings) times `factor`, the EOS row times `eos_factor` more (EOS becomes likely in
    some rows); the weights are restored exactly afterwards."""
    w = model.lm_head.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(factor)
        if eos_id is not None:
            w[eos_id] *= eos_factor
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_generate(tiny, dtype):
    model, tok = tiny
    if dtype == "bfloat16":  # the 26B's dtype: generate() rounds the self-conditioning logits to it
        model = copy.deepcopy(model).to(torch.bfloat16)
    prompts = torch.randint(7, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    for factor, steps in ((1.0, 4), (6.0, 12), (6.0, 48)):
        with sharpened(model, factor):  # confident logits, so steps accept tokens
            torch.manual_seed(123)
            ref = model.generate(prompts, max_new_tokens=model.config.canvas_length, max_denoising_steps=steps,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            ours = sample(model, prompts, SamplerConfig(max_steps=steps, mode="reference"), torch.Generator().manual_seed(123),
                          tok.eos_token_id, tok.pad_token_id)
        assert torch.equal(ref.sequences[:, prompts.shape[1]:], ours.tokens), (factor, steps)
        n_tokens = (ours.tokens != tok.pad_token_id).sum(-1)
        torch.testing.assert_close(ref.tokens_per_forward.float(), n_tokens / ours.nfe)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def short_model(tiny_short, request):
    """The canvas-8 tiny model in float32, and a bfloat16 copy (the 26B's dtype)."""
    model, tok = tiny_short
    if request.param == "bfloat16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    return model, tok


def test_matches_generate_over_several_canvases(short_model):
    """Canvas 8, up to 3 canvases (one where max_canvases is 1), fp32 and bf16: rows that emit EOS in one canvas
    and rows that go on (the done rows are still denoised and encoded, padded, as generate() does), with and
    without early stopping: same tokens, same tokens per forward pass."""
    model, tok = short_model
    eos, pad, l = tok.eos_token_id, tok.pad_token_id, model.config.canvas_length
    prompts = torch.randint(7, 40, (6, 12), generator=torch.Generator().manual_seed(0))
    canvases_run, ends_in_first = set(), set()
    for factor, eos_factor, steps, n_canvases in ((1.0, 1.0, 4, 3), (6.0, 2.0, 12, 3), (30.0, 2.0, 48, 3),
                                                  (30.0, 1.5, 8, 3), (6.0, 2.0, 5, 1)):
        with sharpened(model, factor, eos, eos_factor):
            torch.manual_seed(123)
            ref = model.generate(prompts, max_new_tokens=n_canvases * l, max_denoising_steps=steps,
                                 eos_token_id=eos, pad_token_id=pad)
            cfg = SamplerConfig(max_steps=steps, max_canvases=n_canvases, mode="reference")
            ours = sample(model, prompts, cfg, torch.Generator().manual_seed(123), eos, pad)
        ref_tokens = ref.sequences[:, prompts.shape[1]:]
        assert ref_tokens.shape == ours.tokens.shape and torch.equal(ref_tokens, ours.tokens), (factor, steps)
        n_tokens = (ours.tokens != pad).sum(-1)
        torch.testing.assert_close(ref.tokens_per_forward.float(), n_tokens / ours.nfe)
        canvases_run.add(ours.tokens.shape[1] // l)
        first_eos = (ours.tokens[:, :l] == eos).any(-1)
        if ours.tokens.shape[1] > l:
            ends_in_first.add((bool(first_eos.any()), bool((~first_eos).any())))
    assert {1, 3} <= canvases_run  # the cases do exercise several canvases
    assert (True, True) in ends_in_first  # ... with rows ending in the first canvas while others go on


def test_entropy_bound_acceptance():
    h = torch.tensor([[0.01, 0.5, 0.02, 0.03, 2.0]])
    # sorted: .01 .02 .03 .5 2.0; cumsum - self: 0, .01, .03, .06, .56 -> first four accepted (<= 0.1)
    assert entropy_bound_accept(h, 0.1).tolist() == [[True, True, True, True, False]]
    assert entropy_bound_accept(h, 0.0).sum() == 1  # always at least the most certain position
    logits = torch.randn(2, 3, 7)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits), ref)


def test_adaptive_stop_counts_forward_passes(tiny):
    model, tok = tiny
    prompts = torch.randint(7, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    with sharpened(model, 30.0):
        out = sample(model, prompts, SamplerConfig(max_steps=48), torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id)
    assert (out.nfe >= 2).all() and (out.nfe < 48).all()  # confident and stable rows stop early
