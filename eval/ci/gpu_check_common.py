"""What every family's GPU check (eval/ci/gpu_check_*.py) does first, in one place."""

from __future__ import annotations


def refuse_then_load(path: str, tag: str):
    """Check 1 of a family's GPU check: the checkpoint folder `path` loaded without `model.trust_remote_code=true` is
    refused with dgtune's one-line error (printed). Then load it as a user's run does, through dgtune's own loader
    (`dgtune.models.load.load_model`: the family profile's class, safetensors, bf16, the family's [MASK] for a
    tokenizer that names none) with `trust_remote_code`; returns (model on the GPU in eval mode, tokenizer)."""
    from omegaconf import OmegaConf

    from dgtune.config import compose
    from dgtune.errors import ConfigError
    from dgtune.models.load import load_model

    cfg = OmegaConf.merge(compose(["model=diffusiongemma_26b"]).model,
                          {"name_or_path": path, "attn_implementation": None})
    try:
        load_model(cfg)
        raise AssertionError("loaded without trust_remote_code")
    except ConfigError as e:
        print(f"[{tag}] 1 refused without trust_remote_code:", str(e)[:100])
    model, tok = load_model(OmegaConf.merge(cfg, {"trust_remote_code": True}))
    return model.cuda().eval(), tok
