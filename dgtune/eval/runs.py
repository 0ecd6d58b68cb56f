"""A finished run's folder as the eval and sample commands read it: its weights (`load_run`), what its training
recorded (`training_meta`), overrides on its saved config (`merge_overrides`), and where a new report goes
(`eval_out_dir`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dgtune.sampling.config import SamplerConfig

CONFIG_GROUPS = ("sampler",)  # `group=NAME` overrides load configs/<group>/NAME.yaml


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
        from transformers import AutoConfig, AutoTokenizer

        from dgtune.models.family import family_of

        family = family_of(AutoConfig.from_pretrained(str(final)))
        tuned = family.load_class().from_pretrained(str(final), use_safetensors=True)
        base = None
        if cfg.model.source != "scratch":
            base, _ = load_model(cfg.model)
        return tuned, AutoTokenizer.from_pretrained(str(final)), base
    raise FileNotFoundError(f"{final} holds no adapter (adapter_config.json) or model (model.safetensors): "
                            "did training finish? A killed run can be resumed with resume=true.")


def training_meta(run_dir: Path) -> dict:
    """What the run's training recorded of its precision and machine (`RUN_DIR/environment.json`), for a report
    made later; empty for runs saved before it was written."""
    path = Path(run_dir) / "environment.json"
    if not path.exists():
        return {}
    env = json.loads(path.read_text())
    return {"train_precision": env.get("precision"), "train_environment": env}


if __name__ == "__main__":
    main()


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
    from dgtune.errors import InputError

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
