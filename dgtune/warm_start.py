"""`init_from=RUN_DIR`: start training from the weights of a finished run (or a published folder) instead of the
bare base: RL after SFT (`method=rl`), or more SFT from where a run stopped (the control RL is measured against).

The folder must hold the run's `config.yaml` and its weights in `final/` (a LoRA adapter, `adapter_config.json`, or
a full model, `model.safetensors`). The new run keeps the run's model and task: a folder of another base model or
another task is refused before any work (`check_init_from`), with one line naming the key that differs.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dgtune.errors import InputError

SAME_KEYS = ("model.source", "model.name_or_path", "task.name", "task.size", "task.canvas_length", "task.layout",
             "task.template", "task.compact_prompt")  # what the init weights were trained for must match


def init_folder(cfg: DictConfig) -> Path | None:
    """The `final/` folder of `cfg.init_from`, or None when it is not set."""
    src = cfg.get("init_from")
    return None if not src else Path(src) / "final"


def check_init_from(cfg: DictConfig) -> None:
    """`init_from` names a finished run of the same base model and task: its config and its final weights exist,
    and every key of `SAME_KEYS` agrees with this run's (InputError naming the folder and the key otherwise)."""
    final = init_folder(cfg)
    if final is None:
        return
    src = final.parent
    if not (src / "config.yaml").is_file():
        raise InputError(f"init_from={str(src)!r}: no such run folder (no config.yaml there)")
    if not ((final / "adapter_config.json").is_file() or (final / "model.safetensors").is_file()):
        raise InputError(f"init_from={str(src)!r}: {final} holds no adapter (adapter_config.json) or model "
                         "(model.safetensors); did that run finish?")
    theirs = OmegaConf.load(src / "config.yaml")
    for key in SAME_KEYS:
        a, b = OmegaConf.select(theirs, key, default=None), OmegaConf.select(cfg, key, default=None)
        if a != b:
            raise InputError(f"init_from={str(src)!r} was trained with {key}={a!r}, this run has {key}={b!r}: "
                             "start from a run of the same base model and task")


def load_init(model, cfg: DictConfig):
    """The model to train, with the weights of `init_from`: its adapter loaded trainable on the base (`lora.*` of
    this run is not used: the adapter keeps its own rank and targets), or its full model (the base's class and dtype).
    Without `init_from`, None (the caller applies `lora` as usual)."""
    final = init_folder(cfg)
    if final is None:
        return None
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(final), is_trainable=True)
    from dgtune.models.family import family_of

    full = family_of(model).load_class().from_pretrained(str(final), use_safetensors=True, dtype=model.dtype)
    full.config.canvas_length = model.config.canvas_length
    return full
