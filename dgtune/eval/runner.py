"""Run the sampler over task rows for a sweep of step counts and grade every output (`evaluate`), and the whole
report of a model on a task's test rows, tuned and base (`run_report`), as training's end and `dgtune.eval` run it."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from dgtune.data import prompt_ids, row_prompt
from dgtune.eval.report import aggregate, format_table, write_report
from dgtune.sampling.config import sampler_config
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
             progress: bool = False, on_verifier_error: str = "fail"):
    """Sample and grade every row at every step count. With a task that uses canvas templates, the known tokens
    are clamped; with `guided`, the task's rule checker vetoes accepted tokens that break a hard constraint.

    Returns (records, timings): one record per (steps, row) with the row index, output text, grade, bucket and NFE; timings map
    (model, sampler, steps) -> {"tokens", "seconds"} (tokens = generated tokens up to and including EOS).
    `progress` shows a progress bar over the sweep (batches x step counts) on stderr.
    A row without a reference answer (an empty `response`, e.g. a prompt-only test file) has `exact` None: it is
    left out of the exact rate. A verifier that raises or returns a bad grade stops the eval (VerifierError naming
    it and the row), or with `on_verifier_error="count"` the row counts as wrong (`verifier_error` 1).
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
                    grade = grade_row(task, rows[i], text, on_verifier_error)
                    records.append({"model": model_name, "sampler": sampler_name, "steps": int(steps), "row": int(i),
                                    "task": rows[i].get("task"), "bucket": rows[i].get("bucket") or None,
                                    "nfe": float(res.nfe[j]),
                                    "output": text, **grade})
        timings[(model_name, sampler_name, int(steps))] = {"tokens": n_tokens, "seconds": seconds}
    bar.close()
    return records, timings


def grade_row(task, row: dict, text: str, on_verifier_error: str = "fail") -> dict:
    """`task.grade(row, text)` with the grades checked (finite, in [0, 1]); `exact` None when the row has no
    reference answer. A VerifierError stops, or with `on_verifier_error="count"` the row is graded wrong."""
    from dgtune.errors import VerifierError
    from dgtune.tasks.base import GRADE_KEYS, grade_value

    try:
        grade = task.grade(row, text)
        grade = {k: (grade_value(v, f"task {task.name}: {k}") if k in GRADE_KEYS and v is not None else v)
                 for k, v in grade.items()}
    except VerifierError:
        if on_verifier_error != "count":
            raise
        return {"solved": 0.0, "exact": 0.0, "cell_acc": 0.0, "parse_fail": 0.0, "verifier_error": 1.0}
    if not str(row.get("response") or "").strip():  # nothing to compare with: exact is undefined, never true
        grade["exact"] = None
    return grade


def test_rows(task, splits, cfg) -> list[dict]:
    """`task.test_file` if set (CSV, graded by the task's rules), else the generated test split."""
    if cfg.task.get("test_file"):
        return task.load_test_file(cfg.task.test_file)
    return splits["test"]


def require_test_rows(task, splits, cfg) -> None:
    """Stop before any work when there is nothing to evaluate (a data task without a test file)."""
    if not cfg.task.get("test_file") and not splits["test"]:
        raise ValueError(f"task {task.name}: no test rows to evaluate (set task.files.test or task.test_file)")


def _base_for(model, base_model, cfg, task):
    """(base model, context to sample it in): the one given, the tuned model with its adapter disabled, or a fresh
    load of `cfg.model` (a full fine-tune)."""
    if base_model is not None:
        return base_model, nullcontext()
    if hasattr(model, "disable_adapter"):
        return model, model.disable_adapter()
    from dgtune.models.load import load_model

    base, _ = load_model(cfg.model)
    base.config.canvas_length = task.canvas_length
    return base, nullcontext()


def run_report(model, tokenizer, task, splits, cfg, run_dir, tracker=None, meta=None, base_model=None) -> str:
    """Evaluate tuned (and base) over `eval.steps`, write the report files, print the table; returns report.json."""
    rows = test_rows(task, splits, cfg)
    if cfg.eval.get("max_rows"):
        rows = rows[: cfg.eval.max_rows]
    scfg = sampler_config(cfg)
    name = cfg.sampler.get("name", scfg.strategy)
    steps = list(cfg.eval.steps)
    bars = bool(cfg.get("trainer", {}).get("progress_bar", True))
    errors = cfg.eval.get("on_verifier_error", "fail")
    guided = bool(cfg.eval.get("guided"))  # verifier-guided renoising: its own curve, never mixed into the plain one

    def curve(label, which, sampler, sampler_name, through_guide=False):
        return evaluate(which, tokenizer, task, rows, steps, sampler, cfg.eval.batch_size, cfg.seed, label,
                        sampler_name, guided=through_guide, progress=bars, on_verifier_error=errors)

    curves = {"tuned": curve("tuned", model, scfg, name)}  # name -> (records, timings)
    if cfg.eval.compare_base:
        base, ctx = _base_for(model, base_model, cfg, task)
        # the base is sampled as it was trained (a denoiser; with self-conditioning where its family has it, as
        # DiffusionGemma's released objective), whatever the adapter learned
        from dgtune.models.family import family_of

        base_cfg = replace(scfg, prediction="denoiser", self_conditioning=family_of(model).self_conditioning)
        with ctx:
            curves["base"] = curve("base", base, base_cfg, name)
            if guided:  # the base through the same guide: what the rules alone give without the fine-tune
                curves["base+verifier"] = curve("base", base, base_cfg, f"{name}+verifier", True)
    if guided:
        curves["tuned+verifier"] = curve("tuned", model, scfg, f"{name}+verifier", True)
    order = [k for k in ("base", "base+verifier", "tuned", "tuned+verifier") if k in curves]  # the report's order
    records = [r for k in order for r in curves[k][0]]
    timings = {key: t for k in order for key, t in curves[k][1].items()}
    table_rows = aggregate(records, timings)
    out_dir = Path(cfg.eval.get("out_dir") or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from dgtune.runtime import environment

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"task": task.name, "test_rows": len(rows), "test_file": cfg.task.get("test_file"), "sampler": name,
            "model": cfg.model.get("name_or_path") or cfg.model.source, **(meta or {}),
            "eval_environment": environment(f"{dtype} weights, no autocast")}
    if errors == "count":  # rows a verifier failed on, counted as wrong (eval.on_verifier_error=count)
        meta["verifier_errors"] = int(sum(r.get("verifier_error", 0) for r in records))
    paths = write_report(out_dir, table_rows, meta)
    print(format_table(table_rows))
    print(f"[dgtune] report: {paths['md']} (table), {paths['json']}, plot: {paths['png']}")
    if tracker is not None:
        tracker.log_report(paths, table_rows)
    return str(paths["json"])
