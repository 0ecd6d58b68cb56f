"""The dgtune sampler reproduces transformers' DiffusionGemma generate() token for token."""

import torch

from dgtune.sampling.sampler import SamplerConfig, entropy_bound_accept, sample, token_entropy


def _sharpen(model, factor):
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)  # tied to the embeddings: makes logits confident, so steps accept tokens


def test_matches_generate(tiny):
    model, tok = tiny
    prompts = torch.randint(7, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    for factor, steps in ((1.0, 4), (6.0, 12), (6.0, 48)):
        _sharpen(model, factor)
        try:
            torch.manual_seed(123)
            ref = model.generate(prompts, max_new_tokens=model.config.canvas_length, max_denoising_steps=steps,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            ours = sample(model, prompts, SamplerConfig(max_steps=steps), torch.Generator().manual_seed(123),
                          tok.eos_token_id, tok.pad_token_id)
        finally:
            _sharpen(model, 1.0 / factor)
        assert torch.equal(ref.sequences[:, prompts.shape[1]:], ours.tokens), (factor, steps)
        n_tokens = (ours.tokens != tok.pad_token_id).sum(-1)
        torch.testing.assert_close(ref.tokens_per_forward.float(), n_tokens / ours.nfe)


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
    _sharpen(model, 30.0)
    try:
        out = sample(model, prompts, SamplerConfig(max_steps=48), torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id)
    finally:
        _sharpen(model, 1 / 30.0)
    assert (out.nfe >= 2).all() and (out.nfe < 48).all()  # confident and stable rows stop early
