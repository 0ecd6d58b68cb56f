"""The block sampler of the block-diffusion families (`ModelFamily.block_diffusion`: LLaDA2, SDAR): LLaDA2's block
refinement, the algorithm of LLaDA2's own `generate()` and of diffusers' `LLaDA2Pipeline` + `BlockRefinementScheduler`
(tests/test_llada2.py checks that both draw the same tokens for the same seed).

The answer of `gen` tokens follows the prompt; the sequence is cut into blocks of `block_length` at absolute positions
from 0, so the prompt's tail shares a block with the first answer tokens. Every answer position starts as [MASK];
blocks are denoised in order, each step running the model over the window up to the current block (block-causal
attention, `families/llada2.window_hidden`) and reading the current block's logits:

- candidates: the argmax and its probability (`commit=argmax`, temperature 0), or a draw from softmax(logits / t_max)
  (`commit=sample`, one `torch.multinomial` over the batch from `generator`); a canvas template's known tokens
  are written first and count as committed;
- commits: the masked positions above `threshold` when there are at least as many as the step's count (the block
  length spread evenly over `max_steps` = min(`max_steps`, gen // `minimal_topk`) steps, the remainder first), else
  the count's most confident;
- with `editing_threshold` > 0 (LLaDA2.1): a committed answer token is rewritten when another token is predicted
  above it, and a block with no [MASK] left is refined until nothing changes (at most `max_post_steps` steps);
- with `eos_early_stop`: a row that has committed an EOS with no [MASK] before it is frozen, and sampling ends when
  every row is;
- a block with no [MASK] left gets one more pass (LLaDA2's `generate()`), or with `complete_block_pass=false` none
  (SDAR's `generate.py`, `sampler=sdar_block`).
The output is the answer with pad after each row's first EOS; `nfe` counts the forward passes of each unfinished row.
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import family_calls, lm_logits
from dgtune.sampling.config import SampleResult, SamplerConfig, pad_after_eos
from dgtune.sampling.fast import TraceStep, resolve_mask_id


def transfer_counts(block_length: int, steps: int) -> torch.Tensor:
    """Commits per step: `block_length` spread evenly over `steps`, the remainder on the first steps. [steps]"""
    counts = torch.full((steps,), block_length // steps, dtype=torch.long)
    counts[: block_length % steps] += 1
    return counts


def candidates(logits: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator | None):
    """(tokens [b, l], their probabilities [b, l]) from logits [b, l, v]: the argmax, or with `commit=sample` one
    multinomial draw per position from softmax(logits / t_max)."""
    flat = logits.reshape(-1, logits.shape[-1])  # [b l, v]
    if cfg.commit == "argmax":
        token = flat.argmax(-1, keepdim=True)
        prob = torch.softmax(flat.float(), dim=-1).gather(-1, token)
    else:
        probs = torch.softmax((flat / cfg.t_max if cfg.t_max != 1.0 else flat).float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        prob = probs.gather(-1, token)
    return token.view(logits.shape[:-1]), prob.view(logits.shape[:-1])


def commits(prob: torch.Tensor, active: torch.Tensor, count: int, threshold: float) -> torch.Tensor:
    """Which masked positions (`active` [b, l]) to commit: those above `threshold` if there are at least `count`,
    else the `count` most confident (fewer if fewer are masked). [b, l] bool"""
    conf = torch.where(active, prob.float(), torch.full_like(prob, -torch.inf, dtype=torch.float32))
    out = torch.zeros_like(active)
    for r in range(conf.shape[0]):  # per row, as the reference schedulers (torch.topk breaks ties the same way)
        high = conf[r] > threshold
        if int(high.sum()) >= count:
            out[r] = high
        else:
            k = min(count, int(active[r].sum()))
            if k > 0:
                out[r, torch.topk(conf[r], k=k).indices] = True
    return out


def eos_finished(x: torch.Tensor, drawn: torch.Tensor, written: torch.Tensor, finished: torch.Tensor, eos_id: int,
                 mask_id: int, p: int) -> torch.Tensor:
    """Rows that are finished after this step: already finished, or an EOS among the tokens written now
    (`drawn`/`written` [b, l]) and the window's first EOS (x [b, w]) is an answer position with no [MASK] before it."""
    finished = finished.clone()
    for r in range(x.shape[0]):
        if finished[r] or not bool((drawn[r][written[r]] == eos_id).any()):
            continue
        at = (x[r] == eos_id).nonzero(as_tuple=True)[0]
        if at.numel() == 0 or int(at[0]) < p:
            continue
        finished[r] = bool((x[r, p:int(at[0])] != mask_id).all())
    return finished


def block_trace_step(x: torch.Tensor, drawn: torch.Tensor, written: torch.Tensor, start: int, p: int, gen: int,
                     cfg: SamplerConfig) -> TraceStep:
    """The `TraceStep` of one pass over the block at `start` (before its write): the answer x[:, p: p + gen] as the
    input canvas, the block's drawn tokens in its answer columns, kept where written with `commit=sample`."""
    b, block = drawn.shape
    canvas = x[:, p: p + gen].clone()  # [b, gen]
    lo, hi = max(start, p), min(start + block, p + gen)  # the block's answer columns (absolute)
    tokens = canvas.clone()
    tokens[:, lo - p: hi - p] = drawn[:, lo - start: hi - start]
    kept = torch.zeros_like(canvas, dtype=torch.bool)
    if cfg.commit == "sample":
        kept[:, lo - p: hi - p] = written[:, lo - start: hi - start]
    return TraceStep(torch.arange(b, device=x.device), canvas, tokens, kept,
                     cfg.t_max if cfg.commit == "sample" else 1.0, None)


@torch.no_grad()
def sample_blocks(model, prompt_ids: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator | None, eos_id: int,
                  pad_id: int, canvas_length: int, template: torch.Tensor | None = None,
                  trace: list | None = None) -> SampleResult:
    """Sample answers of `canvas_length` x `max_canvases` tokens for equal-length prompts [b, p] (module docstring).
    `template` [b, l] (known answer tokens, -1 = free): written before the first step, never [MASK], never edited.
    `trace` (a list, one canvas) receives each forward pass's `TraceStep` over the answer: its input, the tokens
    drawn for the current block, and with `commit=sample` the draws written (committed or edited) as kept. Under
    block-causal attention a block's logits do not depend on the blocks after it, so the answer's input canvas
    replayed whole (`dgtune.rl.likelihood.trajectory`) gives the step's logits."""
    if cfg.strategy != "threshold":
        raise ValueError(f"a block-diffusion model samples with sampler.strategy=threshold (LLaDA2's block refinement: "
                         f"`sampler=block_refine`), not {cfg.strategy!r}")
    if cfg.noise != "mask":
        raise ValueError("a block-diffusion model samples from [MASK]: sampler.noise=mask (`sampler=block_refine`)")
    if trace is not None and cfg.max_canvases != 1:
        raise ValueError("a sampler trace covers one canvas: set sampler.max_canvases=1")
    calls = family_calls(model)
    mask_id = resolve_mask_id(model, cfg)
    block = cfg.block_length or calls.block_size(model)
    b, p = prompt_ids.shape
    device = prompt_ids.device
    gen = canvas_length * cfg.max_canvases
    steps = min(cfg.max_steps, gen // max(cfg.minimal_topk, 1))
    counts = transfer_counts(block, steps).tolist()
    n_blocks = -(-(p + gen) // block)
    x = torch.full((b, n_blocks * block), mask_id, dtype=torch.long, device=device)
    x[:, :p] = prompt_ids
    fixed = torch.zeros_like(x, dtype=torch.bool)  # prompt and template positions: never edited
    fixed[:, :p] = True
    if template is not None:
        cols = slice(p, p + template.shape[1])
        x[:, cols] = torch.where(template >= 0, template, x[:, cols])
        fixed[:, cols] = template >= 0
    key_mask = torch.zeros_like(x)
    key_mask[:, : p + gen] = 1
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    nfe = torch.zeros(b, device=device)
    editing = cfg.editing_threshold > 0
    for k in range(p // block, n_blocks):
        end, start = (k + 1) * block, k * block
        step, post = 0, 0
        while True:
            current = x[:, start:end]  # [b, l]
            active = current == mask_id
            masks_left = bool(active.any())
            if not masks_left and not editing and not cfg.complete_block_pass:  # SDAR: the next block at once
                break
            post += not masks_left
            nfe += (~finished).float()
            hidden = calls.window_hidden(model, x[:, :end], key_mask[:, :end])  # [b, end, d]
            drawn, prob = candidates(lm_logits(model, hidden[:, -block:]), cfg, generator)  # [b, l]
            write = (commits(prob, active, counts[min(step, steps - 1)], cfg.threshold) if masks_left
                     else torch.zeros_like(active))
            edit = torch.zeros_like(active)
            if editing:
                editable = ~active & ~fixed[:, start:end]
                edit = editable & (prob.float() > cfg.editing_threshold) & (drawn != current)
            written = (write | edit) & ~finished[:, None] if cfg.eos_early_stop else write | edit
            if trace is not None:
                trace.append(block_trace_step(x, drawn, written, start, p, gen, cfg))
            x[:, start:end] = torch.where(written, drawn, current)
            if cfg.eos_early_stop:
                finished = eos_finished(x[:, :end], drawn, written, finished, eos_id, mask_id, p)
            step += masks_left
            if (bool(finished.all()) or (not masks_left and (not editing or not bool(edit.any())))
                    or (masks_left and step >= steps) or (not masks_left and post > cfg.max_post_steps)):
                break
        if cfg.eos_early_stop and bool(finished.all()):
            break
    answer = x[:, p: p + gen]
    return SampleResult(tokens=pad_after_eos(answer, eos_id, pad_id), nfe=nfe)
