"""`python -m dgtune.eval RUN_DIR [key=value ...]`: accuracy against denoising steps, base vs tuned.

Loads the run's config (`RUN_DIR/config.yaml`), applies the overrides (e.g. `task.test_file=PATH`,
`eval.steps=[1,4,12]`, `sampler=topk_confidence` to use configs/sampler/topk_confidence.yaml,
`sampler.mode=reference`), loads the base model and the run's adapter (unmerged) from `RUN_DIR/final`, samples the
test rows at every step count with the shared sampler (fast mode unless the config says otherwise), and writes
`report.json`, `report.md` and `accuracy_vs_steps.png` into a new folder `RUN_DIR/eval-<time>/` (or `eval.out_dir`),
never over an existing report unless `eval.overwrite=true` (which, without `eval.out_dir`, writes into RUN_DIR).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dgtune.eval.report import aggregate, format_table, write_report
from dgtune.eval.runner import evaluate
from dgtune.sampling.sampler import SamplerConfig


CONFIG_GROUPS = ("sampler",)  # `group=NAME` overrides load configs/<group>/NAME.yaml
EVAL_DEFAULT_MODE = "fast"  # sampler mode when the config does not set one (runs saved before `mode` existed)


def sampler_config(cfg: DictConfig, tokenizer=None) -> SamplerConfig:
    """SamplerConfig from `cfg.sampler` (the `name` key is a label, not a setting); `mode` defaults to fast,
    `prediction` follows `cfg.objective.prediction` and, with noise "mask", `mask_token_id` is the tokenizer's."""
    d = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if k != "name"}
    d.setdefault("mode", EVAL_DEFAULT_MODE)
    if "objective" in cfg:  # what the decoder outputs is fixed by how the model was trained
        d["prediction"] = cfg.objective.get("prediction", "denoiser")
        # a model trained without the self-conditioning pass never saw previous logits as input: do not feed them
        d.setdefault("self_conditioning", float(cfg.objective.get("self_cond_p", 0.5)) > 0)
    if d.get("noise") == "mask" and d.get("mask_token_id") is None and tokenizer is not None:
        d["mask_token_id"] = tokenizer.mask_token_id
    return SamplerConfig(**d)


def test_rows(task, splits, cfg) -> list[dict]:
    """`task.test_file` if set (CSV, graded by the task's rules), else the generated test split."""
    if cfg.task.get("test_file"):
        return task.load_test_file(cfg.task.test_file)
    return splits["test"]


def require_test_rows(task, splits, cfg) -> None:
    """Stop before any work when there is nothing to evaluate (a data task without a test file)."""
    if not cfg.task.get("test_file") and not splits["test"]:
        raise ValueError(f"task {task.name}: no test rows to evaluate (set task.files.test or task.test_file)")


def run_report(model, tokenizer, task, splits, cfg, run_dir, tracker=None, meta=None, base_model=None) -> str:
    """Evaluate tuned (and base) over `eval.steps`, write the report files, print the table; returns report.json."""
    rows = test_rows(task, splits, cfg)
    if cfg.eval.get("max_rows"):
        rows = rows[: cfg.eval.max_rows]
    scfg = sampler_config(cfg)
    name = cfg.sampler.get("name", scfg.strategy)
    steps = list(cfg.eval.steps)
    bars = bool(cfg.get("trainer", {}).get("progress_bar", True))
    records, timings = evaluate(model, tokenizer, task, rows, steps, scfg, cfg.eval.batch_size, cfg.seed, "tuned", name,
                                progress=bars)
    guided = bool(cfg.eval.get("guided"))  # verifier-guided renoising: its own curve, never mixed into the plain one
    if cfg.eval.compare_base:
        if base_model is not None:
            ctx, base = nullcontext(), base_model
        elif hasattr(model, "disable_adapter"):
            ctx, base = model.disable_adapter(), model
        else:
            from dgtune.models.load import load_model

            base, _ = load_model(cfg.model)
            base.config.canvas_length = task.canvas_length
            ctx = nullcontext()
        # the base is sampled as it was trained (the released objective: a denoiser with self-conditioning),
        # whatever the adapter learned
        base_cfg = replace(scfg, prediction="denoiser", self_conditioning=True)
        with ctx:
            r2, t2 = evaluate(base, tokenizer, task, rows, steps, base_cfg, cfg.eval.batch_size, cfg.seed, "base", name,
                              progress=bars)
            if guided:  # the base through the same guide: what the rules alone give without the fine-tune
                r4, t4 = evaluate(base, tokenizer, task, rows, steps, base_cfg, cfg.eval.batch_size, cfg.seed, "base",
                                  f"{name}+verifier", guided=True, progress=bars)
                r2, t2 = r2 + r4, {**t2, **t4}
        records, timings = r2 + records, {**t2, **timings}
    if guided:
        r3, t3 = evaluate(model, tokenizer, task, rows, steps, scfg, cfg.eval.batch_size, cfg.seed, "tuned",
                          f"{name}+verifier", guided=True, progress=bars)
        records, timings = records + r3, {**timings, **t3}
    table_rows = aggregate(records, timings)
    out_dir = Path(cfg.eval.get("out_dir") or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from dgtune.runtime import environment

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"task": task.name, "test_rows": len(rows), "test_file": cfg.task.get("test_file"), "sampler": name,
            "model": cfg.model.get("name_or_path") or cfg.model.source, **(meta or {}),
            "eval_environment": environment(f"{dtype} weights, no autocast")}
    paths = write_report(out_dir, table_rows, meta)
    print(format_table(table_rows))
    print(f"[dgtune] report: {paths['md']} (table), {paths['json']}, plot: {paths['png']}")
    if tracker is not None:
        tracker.log_report(paths, table_rows)
    return str(paths["json"])


def load_run(run_dir: Path, cfg: DictConfig, weights: Path | None = None):
    """(tuned model, tokenizer, base model or None) for a finished run: base + adapter unmerged, or a full model;
    from `RUN_DIR/final`, or from `weights` (e.g. a checkpoint's `weights/` folder)."""
    from dgtune.models.load import load_model

    final = Path(weights) if weights is not None else run_dir / "final"
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        base, tokenizer = load_model(cfg.model)
        return PeftModel.from_pretrained(base, str(final)), tokenizer, None
    if (final / "model.safetensors").exists():
        from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

        tuned = DiffusionGemmaForBlockDiffusion.from_pretrained(str(final), use_safetensors=True)
        base = None
        if cfg.model.source != "scratch":
            base, _ = load_model(cfg.model)
        return tuned, AutoTokenizer.from_pretrained(str(final)), base
    raise FileNotFoundError(f"{final} holds no adapter (adapter_config.json) or model (model.safetensors): "
                            "did training finish? A killed run can be resumed with resume=true.")


def load_group(group: str, name: str) -> DictConfig:
    """configs/<group>/<name>.yaml, or an error listing the available names."""
    from dgtune.config import config_dir

    path = config_dir() / group / f"{name}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise FileNotFoundError(f"no {group} config {name!r} (available: {names})")
    return OmegaConf.load(path)


def _known_key(cfg: DictConfig, key: str) -> bool:
    if OmegaConf.select(cfg, key, default="__missing__") != "__missing__":
        return True
    group, _, field = key.partition(".")  # sampler and eval settings added after a run was saved
    if group == "eval":
        from dgtune.config import config_dir

        return field in OmegaConf.load(config_dir() / "eval" / "default.yaml")
    return group == "sampler" and field in SamplerConfig.__dataclass_fields__


def merge_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply overrides: `group=NAME` (e.g. `sampler=topk_confidence`) replaces that config group with
    configs/<group>/NAME.yaml first, then `key=value` overrides are merged; an unknown key is an error that names it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
    cfg = cfg.copy()
    plain = []
    for item in overrides:
        key, value = item.split("=", 1)
        if key.lstrip("+") in CONFIG_GROUPS:
            OmegaConf.update(cfg, key.lstrip("+"), load_group(key.lstrip("+"), value), merge=False)
        else:
            plain.append(item)
    for item in plain:
        key = item.split("=", 1)[0].lstrip("+")
        if not item.startswith("+") and not _known_key(cfg, key):
            raise KeyError(f"unknown config key {key!r} (use +{key}=... to add a new key)")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in plain]))


def eval_out_dir(run_dir: Path, cfg: DictConfig) -> Path:
    """Where `dgtune.eval` writes: `eval.out_dir`, else RUN_DIR with `eval.overwrite=true`, else a new
    `RUN_DIR/eval-<time>`; InputError when that folder already has a report and `eval.overwrite` is not set."""
    from dgtune.validate import InputError

    overwrite = bool(cfg.eval.get("overwrite", False))
    if cfg.eval.get("out_dir"):
        out = Path(cfg.eval.out_dir)
    elif overwrite:
        out = run_dir
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out, k = run_dir / f"eval-{stamp}", 1
        while out.exists():
            k += 1
            out = run_dir / f"eval-{stamp}-{k}"
    if (out / "report.json").exists() and not overwrite:
        raise InputError(f"{out / 'report.json'} exists: pass eval.overwrite=true to replace it, or another "
                         "eval.out_dir")
    return out


def main(argv: list[str] | None = None) -> str:
    """CLI entry point (dgtune's own errors print one line and exit 2)."""
    from dgtune.validate import cli_errors

    with cli_errors():
        return _main(argv)


def _main(argv: list[str] | None = None) -> str:
    import torch

    from dgtune.validate import check_config, check_task_features, quiet_third_party

    from dgtune.data import splits_for
    from dgtune.tasks import build_task

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return ""
    run_dir = Path(argv[0])
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a dgtune run folder (no config.yaml)")
    cfg = merge_overrides(OmegaConf.load(run_dir / "config.yaml"), argv[1:])
    check_config(cfg, sections=("eval", "task", "sampler"))
    quiet_third_party()
    task = build_task(cfg.task)
    check_task_features(cfg, task)  # before any folder is made
    out_dir = eval_out_dir(run_dir, cfg)
    cfg.eval.out_dir = str(out_dir)
    torch.manual_seed(cfg.seed)
    if cfg.task.get("test_file"):
        test_rows(task, None, cfg)  # a bad test file fails before the models are loaded
    tuned, tokenizer, base = load_run(run_dir, cfg)
    for m in (tuned, base):
        if m is not None:
            m.config.canvas_length = task.canvas_length
    splits = None
    if not cfg.task.get("test_file"):
        splits = splits_for(task, cfg)
        require_test_rows(task, splits, cfg)
    return run_report(tuned, tokenizer, task, splits, cfg, out_dir, None, base_model=base, meta=training_meta(run_dir))


def training_meta(run_dir: Path) -> dict:
    """What the run's training recorded of its precision and machine (`RUN_DIR/environment.json`), for a report
    made later; empty for runs saved before it was written."""
    import json

    path = Path(run_dir) / "environment.json"
    if not path.exists():
        return {}
    env = json.loads(path.read_text())
    return {"train_precision": env.get("precision"), "train_environment": env}


if __name__ == "__main__":
    main()
