"""Run the sampler over task rows for a sweep of step counts and grade every output."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from dgtune.data import prompt_ids, row_prompt
from dgtune.sampling.sampler import SamplerConfig, sample


def group_by_prompt_length(tokenizer, rows: list[dict]) -> list[tuple[list[int], torch.Tensor]]:
    """[(row indices, prompt ids [n, p])] with equal-length prompts in each group (no padding needed)."""
    groups = defaultdict(list)
    for i, row in enumerate(rows):
        ids = prompt_ids(tokenizer, row_prompt(row))
        groups[len(ids)].append((i, ids))
    return [([i for i, _ in g], torch.tensor([ids for _, ids in g])) for _, g in sorted(groups.items())]


def row_seeds_for(seed: int, row_indices: list[int]) -> torch.Tensor:
    """Per-row sampler seeds [n]: a function of (seed, row index) only, so a row's fast-mode output does not
    depend on the batch size or on the other rows of its batch."""
    return torch.tensor(row_indices, dtype=torch.long) + seed * 1_000_003 + 1


@torch.no_grad()
def warm_up_compiled(model, groups, cfg: SamplerConfig, batch_size: int, eos: int, pad: int, canvas_length: int,
                     templates, device) -> None:
    """With `sampler.compile`, torch.compile compiles on the first call with each new shape (batch size, prompt
    length) and once more for a dynamic batch size: sample every group's batch sizes, plus one more size, for two
    steps (untimed, outputs discarded), so that `tokens_per_s` measures sampling, not compiling."""
    cfg = SamplerConfig(**{**cfg.__dict__, "max_steps": 2})
    for idx, prompts in groups:
        full = min(batch_size, len(idx))
        for n in sorted({full, len(idx) % batch_size or full, 1}):  # full batches, the last one, and size 1
            template = None if templates is None else templates[idx[:n]].to(device)
            sample(model, prompts[:n].to(device), cfg, None, eos, pad, canvas_length,
                   row_seeds=torch.arange(n, device=device), template=template)


@torch.no_grad()
def evaluate(model, tokenizer, task, rows: list[dict], steps_list, sampler_cfg: SamplerConfig, batch_size: int,
             seed: int, model_name: str, sampler_name: str = "entropy_bound", device=None, guided: bool = False,
             progress: bool = False):
    """Sample and grade every row at every step count. With a task that uses canvas templates, the known tokens
    are clamped; with `guided`, the task's rule checker vetoes accepted tokens that break a hard constraint.

    Returns (records, timings): one record per (steps, row) with the row index, output text, grade, bucket and NFE; timings map
    (model, sampler, steps) -> {"tokens", "seconds"} (tokens = generated tokens up to and including EOS).
    `progress` shows a progress bar over the sweep (batches x step counts) on stderr.
    """
    from tqdm import tqdm

    model.eval()
    device = device or next(model.parameters()).device
    groups = group_by_prompt_length(tokenizer, rows)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    records, timings = [], {}
    templates = task.template_tensor(tokenizer, rows) if getattr(task, "use_template", False) else None  # [n, l]
    if sampler_cfg.noise == "mask" and sampler_cfg.mask_token_id is None:
        sampler_cfg = SamplerConfig(**{**sampler_cfg.__dict__, "mask_token_id": tokenizer.mask_token_id})
    if getattr(task, "max_canvases", 1) > sampler_cfg.max_canvases:  # answers that span several canvases
        sampler_cfg = SamplerConfig(**{**sampler_cfg.__dict__, "max_canvases": int(task.max_canvases)})
    if sampler_cfg.compile:
        warm_up_compiled(model, groups, sampler_cfg, batch_size, eos, pad, task.canvas_length, templates, device)
    n_batches = sum(-(-len(idx) // batch_size) for idx, _ in groups)
    bar = tqdm(total=n_batches * len(steps_list), desc=f"eval {model_name} ({sampler_name})", unit="batch",
               disable=not progress, dynamic_ncols=True)
    for steps in steps_list:
        bar.set_postfix(steps=int(steps))
        cfg = SamplerConfig(**{**sampler_cfg.__dict__, "max_steps": int(steps)})
        n_tokens, seconds = 0, 0.0
        for gi, (idx, prompts) in enumerate(groups):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                g = torch.Generator(device=device).manual_seed(seed + 1_000 * gi + start)
                row_seeds = row_seeds_for(seed, chunk).to(device)  # fast mode: outputs independent of batch_size
                t0 = time.perf_counter()
                batch = prompts[start : start + batch_size].to(device)
                template = None if templates is None else templates[chunk].to(device)
                guide = task.make_guide(tokenizer, [rows[i] for i in chunk]) if guided else None
                res = sample(model, batch, cfg, g, eos, pad, task.canvas_length, row_seeds=row_seeds,
                             template=template, guide=guide)
                seconds += time.perf_counter() - t0
                bar.update(1)
                n_tokens += int((res.tokens != pad).sum())
                texts = tokenizer.batch_decode(res.tokens.cpu(), skip_special_tokens=True)
                for j, (i, text) in enumerate(zip(chunk, texts)):
                    grade = task.grade(rows[i], text)
                    records.append({"model": model_name, "sampler": sampler_name, "steps": int(steps), "row": int(i),
                                    "task": rows[i].get("task"), "bucket": rows[i].get("bucket") or None,
                                    "nfe": float(res.nfe[j]),
                                    "output": text, **grade})
        timings[(model_name, sampler_name, int(steps))] = {"tokens": n_tokens, "seconds": seconds}
    bar.close()
    return records, timings
