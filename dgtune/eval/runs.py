"""A finished run's folder as the eval and sample commands read it: its weights (`load_run`), what its training
recorded (`training_meta`), its saved config with the command line's overrides (`compose_run`, Hydra's grammar),
and where a new report goes (`eval_out_dir`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dgtune.sampling.config import SamplerConfig

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


def _upgraded(saved: dict) -> dict:
    """A saved config with the keys added to dgtune since it was written: `sampler` and `objective` on their
    schemas (`SamplerConfig`, `ObjectiveConfig`), `eval` on `configs/eval/default.yaml`; the saved values win."""
    from dataclasses import asdict

    from dgtune.config import config_dir
    from dgtune.diffusion.objective import ObjectiveConfig

    defaults = {"sampler": asdict(SamplerConfig()), "objective": asdict(ObjectiveConfig()),
                "eval": OmegaConf.to_container(OmegaConf.load(config_dir() / "eval" / "default.yaml"))}
    out = dict(saved)
    for group, base in defaults.items():
        out[group] = {**base, **(out.get(group) or {})}
    return out


def compose_run(saved: DictConfig, overrides: list[str]) -> DictConfig:
    """A finished run's config (`RUN_DIR/config.yaml`) with command-line overrides, composed by Hydra as
    `dgtune.train` composes its own: one override grammar. The saved config is the base; `group=NAME` (e.g.
    `sampler=topk_confidence`) replaces that group with `configs/<group>/NAME.yaml` (on its schema); `key=value`
    sets a key the config has (keys added to dgtune since the run was saved take their defaults first);
    `+key=value` adds one. A bad override is a ConfigError naming it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dgtune.config import config_dir, register_configs
    from dgtune.errors import ConfigError
    from dgtune.validate import check_overrides

    check_overrides(overrides)  # `sampler=nope`: one line listing the options
    register_configs()
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"bad override: {e}") from None
    choices = {o.key_or_group: o.value() for o in parsed
               if o.key_or_group in groups and not o.is_delete() and isinstance(o.value(), str)}
    rest = [o.input_line for o in parsed if o.key_or_group not in choices]
    base = _upgraded(OmegaConf.to_container(saved, resolve=False))
    for group in choices:
        base.pop(group, None)
    ConfigStore.instance().store(name="dgtune_saved_run", node={
        "defaults": ["_self_", *({g: n} for g, n in choices.items())], **base})
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("dgtune_saved_run", overrides=rest)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split("\n")[:3]).strip()) from None
    OmegaConf.set_struct(cfg, False)  # as loaded from the file: later code may record settings in it
    return cfg


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
