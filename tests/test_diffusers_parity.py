"""dgtune's reference sampler against code nobody here wrote: diffusers 0.42's `DiffusionGemmaPipeline` with its
`EntropyBoundScheduler` (the `parity` extra, `pip install "dgtune[parity]"`; skipped without it), on the tiny
DiffusionGemma, same seed: the same tokens."""

import pytest
import torch

from dgtune.sampling.config import SamplerConfig, pad_after_eos
from dgtune.sampling.sampler import sample

diffusers = pytest.importorskip("diffusers", reason="diffusers is the `parity` extra")


class IdsProcessor:
    """What the pipeline asks of a processor, for prompts already tokenised: `apply_chat_template` returns the ids
    as they are (one row per message list), `batch_decode` the tokenizer's."""

    def __init__(self, ids: torch.Tensor, tokenizer):
        self.ids, self.tokenizer = ids, tokenizer

    def apply_chat_template(self, messages, **kw):
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids)}

    def batch_decode(self, seqs, **kw):
        return self.tokenizer.batch_decode(seqs, **kw)


@pytest.fixture
def decoder_mask_keyword(monkeypatch):
    """diffusers 0.42.1's pipeline calls the decoder's `create_diffusion_decoder_attention_mask(...,
    past_key_values=...)`; released transformers (5.24, 5.25) name that argument `cache` and raise a TypeError.
    Pass it under the released name (only where the installed transformers lacks the new one)."""
    import inspect

    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as dg

    cls = dg.DiffusionGemmaDecoderModel
    original = cls.create_diffusion_decoder_attention_mask
    if "past_key_values" not in inspect.signature(original).parameters:
        def adapted(config, inputs_embeds, cache=None, decoder_attention_mask=None, past_key_values=None):
            return original(config=config, inputs_embeds=inputs_embeds,
                            cache=past_key_values if cache is None else cache,
                            decoder_attention_mask=decoder_attention_mask)

        monkeypatch.setattr(cls, "create_diffusion_decoder_attention_mask", staticmethod(adapted))


def _pipeline_tokens(model, tok, prompts, steps, n_canvases, seed):
    from diffusers import DiffusionGemmaPipeline, EntropyBoundScheduler

    pipe = DiffusionGemmaPipeline(model=model, scheduler=EntropyBoundScheduler(entropy_bound=0.1, t_max=0.8, t_min=0.4),
                                  processor=IdsProcessor(prompts, tok))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(messages=[[{"role": "user", "content": ""}]] * prompts.shape[0],
               gen_length=n_canvases * model.config.canvas_length, num_inference_steps=steps,
               eos_token_id=tok.eos_token_id, generator=torch.Generator().manual_seed(seed), output_type="seq")
    return pad_after_eos(out.sequences, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("factor,steps,n_canvases", [(30.0, 12, 1), (30.0, 48, 1), (30.0, 8, 3)])
def test_reference_sampler_equals_diffusers_pipeline(tiny_short, decoder_mask_keyword, factor, steps, n_canvases):
    """Canvas 8, one or three canvases, the LM head sharpened so that rows settle within the step budget: dgtune's
    `sampler.mode=reference` and the pipeline draw the same tokens for the same seed (compared up to each row's
    first EOS: the pipeline keeps what a row writes after it). A row that has not settled when the steps run out
    differs by design: the pipeline returns its last canvas (with that step's renoised tokens), dgtune and
    transformers' generate() its argmax."""
    model, tok = tiny_short
    w = model.lm_head.weight
    saved = w.detach().clone()
    prompts = torch.randint(7, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            w.mul_(factor)
            w[tok.eos_token_id] *= 1.5  # EOS likely in some rows, so that several canvases are exercised
        cfg = SamplerConfig(max_steps=steps, max_canvases=n_canvases, mode="reference")
        ours = sample(model, prompts, cfg, torch.Generator().manual_seed(123), tok.eos_token_id, tok.pad_token_id)
        theirs = _pipeline_tokens(model, tok, prompts, steps, n_canvases, 123)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert (ours.nfe < steps * ours.tokens.shape[1] // model.config.canvas_length).any()  # rows settled early
    n = min(ours.tokens.shape[1], theirs.shape[1])
    assert torch.equal(ours.tokens[:, :n], theirs[:, :n]), (ours.tokens, theirs)
    assert (ours.tokens[:, n:] == tok.pad_token_id).all() and (theirs[:, n:] == tok.pad_token_id).all()
