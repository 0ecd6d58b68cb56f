"""The reference sampler loop: the same draws as transformers' `DiffusionGemmaForBlockDiffusion.generate()`.

Per canvas: start from uniform random tokens; each step runs the decoder on the canvas with the cached prompt KV
and the previous step's (temperature-scaled) logits for self-conditioning; the temperature falls linearly from
`t_max` (first step) towards `t_min`; tokens are sampled, the lowest-entropy positions are accepted while the sum of
their entropies minus the largest stays <= `entropy_bound`, the rest are renoised; a row stops when its argmax
canvas is unchanged for `stability_threshold` steps and its mean entropy is < `confidence_threshold`, or at
`max_steps`. The output is the argmax canvas. Canvases continue until EOS (up to `max_canvases`).

With the same seed, the random draws (canvas init, multinomial, renoise) happen in the same order and shapes as
`DiffusionGemmaForBlockDiffusion.generate()`, the rows that emitted EOS in an earlier canvas are still denoised
(and encoded, as pad) as there, and the self-conditioning logits are rounded to the embedding dtype as there, so
both produce the same tokens and forward-pass counts, in fp32 and bf16, for one or several canvases
(tests/test_sampler.py).

That is `mode="reference"`; the front door is `dgtune.sampling.sampler.sample`.
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import decode, embedding_dtype, encode
from dgtune.diffusion.model_calls import vocab_size as model_vocab_size
from dgtune.sampling.config import SampleResult, SamplerConfig, adaptive_stop, pad_after_eos
from dgtune.sampling.strategies import entropy_bound_accept, temperature


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. [b, l, v] -> [b, l]"""
    logp = logits - logits.logsumexp(-1, keepdim=True)  # same ops as torch.distributions.Categorical.entropy
    probs = torch.softmax(logp, dim=-1)
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * probs).sum(-1)


def denoise_step(
    raw_logits: torch.Tensor,
    canvas: torch.Tensor,
    cur_step: int,
    cfg: SamplerConfig,
    vocab_size: int,
    generator: torch.Generator,
):
    """One sampler step on logits [b, l, v] of canvas [b, l].

    Returns (next canvas [b, l], argmax canvas [b, l], processed logits [b, l, v], entropy [b, l]).
    Random draws: one multinomial sample per position, then one renoise token per position.
    """
    b, l = canvas.shape
    logits = raw_logits / temperature(cur_step, cfg.max_steps, cfg.t_min, cfg.t_max)  # [b, l, v]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, vocab_size), 1, generator=generator).view(b, l)
    argmax = logits.argmax(-1)
    entropy = token_entropy(logits)
    accepted = entropy_bound_accept(entropy, cfg.entropy_bound)
    noise = torch.randint(0, vocab_size, (b, l), generator=generator, device=canvas.device)
    next_canvas = torch.where(accepted, sampled, noise)
    return next_canvas, argmax, logits, entropy


@torch.no_grad()
def denoise_canvas(model, cache, batch_size: int, canvas_length: int, vocab_size: int, cfg: SamplerConfig,
                   generator: torch.Generator, position_offset: int, done: torch.Tensor | None = None):
    """Run the denoising loop for one canvas; returns (argmax canvas [b, l], nfe [b]).

    As in generate(), every row is denoised, `done` [b] (rows that emitted EOS in an earlier canvas) included: each
    canvas starts with no row finished, the loop stops when all rows are stable and confident (or at `max_steps`),
    and only the forward passes of rows neither finished nor done are counted. Self-conditioning logits are kept
    in the embedding dtype (bf16 on a bf16 model), as generate() keeps them."""
    device = cache.layers[0].keys.device
    embed_dtype = embedding_dtype(model)
    canvas = torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator, device=device)
    positions = torch.arange(position_offset, position_offset + canvas_length, device=device)[None]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    done = finished if done is None else done
    nfe = torch.zeros(batch_size, device=device)
    history = torch.full((max(cfg.stability_threshold, 1), batch_size, canvas_length), -1, device=device, dtype=torch.long)
    argmax, sc_logits = canvas, None
    for cur_step in range(cfg.max_steps, 0, -1):
        nfe += (~(finished | done)).float()
        raw = decode(model, canvas, cache, self_conditioning_logits=sc_logits, decoder_position_ids=positions)
        next_canvas, new_argmax, logits, entropy = denoise_step(raw, canvas, cur_step, cfg, vocab_size, generator)
        if finished.any():  # rows that already stopped keep their state (finished is all False on step 1)
            f = finished[:, None]
            new_argmax = torch.where(f, argmax, new_argmax)
            next_canvas = torch.where(f, canvas, next_canvas)
            logits = torch.where(f[..., None], sc_logits, logits)  # [b, l, v] fp32 (sc_logits rounded, as generate())
            entropy = token_entropy(logits)
        stop, history = adaptive_stop(history, new_argmax, entropy, cfg)
        finished |= stop
        canvas, argmax, sc_logits = next_canvas, new_argmax, logits.to(embed_dtype)
        if finished.all():
            break
    return argmax, nfe


@torch.no_grad()
def sample_reference(model, prompt_ids: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator, eos_id: int,
                     pad_id: int, canvas_length: int | None = None) -> SampleResult:
    """The generate()-mirroring loop for equal-length prompts [b, p]: every draw from `generator` in generate()'s
    order and shapes, canvas after canvas until every row has emitted EOS (or `max_canvases`)."""
    core_cfg = getattr(model, "config", None)
    canvas_length = canvas_length or core_cfg.canvas_length
    vocab_size = model_vocab_size(model)
    b, p = prompt_ids.shape
    cache, _ = encode(model, prompt_ids)
    done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)  # rows with an EOS in an earlier canvas
    outputs, nfe, cur_len = [], torch.zeros(b, device=prompt_ids.device), p
    for k in range(cfg.max_canvases):
        argmax, n = denoise_canvas(model, cache, b, canvas_length, vocab_size, cfg, generator, cur_len, done)
        nfe += n
        # generate()'s finalisation: done rows get pad, this canvas' EOS rows pad after their EOS
        out = pad_after_eos(torch.where(done[:, None], torch.full_like(argmax, pad_id), argmax), eos_id, pad_id)
        outputs.append(out)
        done = done | (argmax == eos_id).any(-1)
        if done.all() or k + 1 == cfg.max_canvases:
            break
        positions = torch.arange(cur_len, cur_len + canvas_length, device=prompt_ids.device)[None]
        cache, _ = encode(model, out, cache=cache, position_ids=positions)  # the finalised canvas, as generate()
        cur_len += canvas_length
    return SampleResult(tokens=pad_after_eos(torch.cat(outputs, dim=1), eos_id, pad_id), nfe=nfe)
