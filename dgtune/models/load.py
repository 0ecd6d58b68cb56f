"""Load a DiffusionGemma (bundled tiny base, a local folder, a Hub id, a fresh tiny or 26B-shaped one) and its tokenizer."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from dgtune.errors import InputError, ModelNotAvailableError
from dgtune.models.built import BUILT
from dgtune.models.family import family_of
from dgtune.models.quant import bnb_config, default_device_map, quantised_copy
from dgtune.models.unsloth_backend import check_backend, load_with_unsloth

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-diffusiongemma"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_path(name_or_path: str) -> str:
    """Return a local folder or a Hub id that is cached or reachable; otherwise fail at once with a clear error."""
    if Path(name_or_path).is_dir():
        return name_or_path
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/")):
        raise ModelNotAvailableError(f"model path {name_or_path!r} is not a folder with config.json and weights")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path  # in the local Hub cache
    if not _hub_reachable():
        raise ModelNotAvailableError(
            f"cannot load {name_or_path!r}: it is not in the local Hugging Face cache and the Hub is unreachable "
            "(offline, or HF_HUB_OFFLINE=1). Download it where the Hub is reachable "
            f"(`hf download {name_or_path}`) and copy the cache, or pass model.name_or_path=/local/folder."
        )
    return name_or_path


def check_model_files(cfg) -> None:
    """Fail at once, naming the file, when a local model folder (the bundled base, or model.name_or_path) lacks
    config.json or holds a safetensors file whose header cannot be read (truncated, corrupted)."""
    from safetensors import safe_open

    if cfg.source == "bundled":
        folder = BUNDLED_DIR
    elif cfg.source == "pretrained":
        path = resolve_model_path(cfg.name_or_path)
        if not Path(path).is_dir():
            return  # a Hub id in the local cache: read by from_pretrained
        folder = Path(path)
    else:
        return
    if not (folder / "config.json").exists():
        raise InputError(f"model folder {folder} has no config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"model folder {folder} has no *.safetensors weights (dgtune loads safetensors only)")
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # SafetensorError: truncated or corrupted header
            raise InputError(f"model weights {f} cannot be read ({e}); restore or re-download the file") from None


def model_config(path: str, trust: bool):
    """The checkpoint's config. A family whose code ships with its checkpoints (`remote_code`, e.g. LLaDA) without
    `model.trust_remote_code=true` is a ConfigError that says so, before transformers' own error."""
    import json

    from transformers import AutoConfig

    if not trust:
        local = Path(path) / "config.json"
        raw = json.loads(local.read_text()) if local.is_file() else None
        if raw is not None:
            from omegaconf import OmegaConf

            try:
                fam = family_of(OmegaConf.create({k: raw.get(k) for k in ("architectures", "model_type")}))
            except Exception:  # an unknown family: transformers' own loading says what it is
                fam = None
            if fam is not None and fam.remote_code:
                from dgtune.errors import ConfigError

                raise ConfigError(f"model.name_or_path={path} is a {fam.name} checkpoint, whose model code ships with "
                                  "it and is not in transformers: run it with model.trust_remote_code=true (it "
                                  "executes that code; read it first)")
    return AutoConfig.from_pretrained(path, trust_remote_code=trust)


def load_model(cfg) -> tuple[torch.nn.Module, object]:
    """Build or load the model described by `configs/model/*.yaml`; returns (model, tokenizer).

    `model.quantization` (null | 4bit | 8bit) loads the base through bitsandbytes (`dgtune.models.quant`);
    `model.backend=unsloth` loads it through unsloth's loader (`dgtune.models.unsloth_backend`, CUDA only)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    backend = check_backend(cfg)  # fails at once where model.backend cannot run
    quantization = None if backend == "unsloth" else bnb_config(cfg.get("quantization"))  # same for bitsandbytes
    if cfg.source in BUILT:  # models built in code
        import importlib

        module, fn = BUILT[cfg.source].split(":")
        build = getattr(importlib.import_module(module), fn)
        model, tokenizer = build(seed=cfg.get("init_seed", 0), **dict(cfg.get("sizes") or {}))
        if quantization is not None:
            model = quantised_copy(model, cfg.quantization, dtype=DTYPES[cfg.get("dtype", "float32")])
        return model, tokenizer
    if cfg.source == "bundled":
        path = str(BUNDLED_DIR)
        if not (BUNDLED_DIR / "model.safetensors").exists():
            raise ModelNotAvailableError(
                f"the bundled tiny base is missing at {BUNDLED_DIR}; build it with `python -m dgtune.train recipe=tiny_base`"
            )
    elif cfg.source == "pretrained":
        path = resolve_model_path(cfg.name_or_path)
    else:
        raise ValueError(f"model.source must be 'bundled', 'pretrained' or one of {', '.join(BUILT)}, got {cfg.source!r}")
    if backend == "unsloth":
        return load_with_unsloth(path, cfg, DTYPES[cfg.get("dtype", "bfloat16")])
    trust = bool(cfg.get("trust_remote_code", False))
    family = family_of(model_config(path, trust))  # its class, skip list, ...
    if quantization is not None:
        quantization = bnb_config(cfg.quantization, family.quant_skip_modules)
    kwargs = {"dtype": DTYPES[cfg.get("dtype", "float32")], "use_safetensors": True, "trust_remote_code": trust}
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg.device_map
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs.setdefault("device_map", default_device_map())
    model = family.load_class().from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return model, with_mask_token(tokenizer, family)


def with_mask_token(tokenizer, family):
    """`tokenizer`, its mask token set to the family's [MASK] id (`ModelFamily.mask_token_id`) when it names none
    (LLaDA's and LLaDA2's tokenizers do not; the objectives and samplers read `tokenizer.mask_token_id`)."""
    if tokenizer.mask_token_id is None and family.mask_token_id is not None:
        token = tokenizer.convert_ids_to_tokens(family.mask_token_id)
        if token is None:
            raise InputError(f"the {family.name} tokenizer has no token {family.mask_token_id} "
                             "(the family's [MASK] id)")
        tokenizer.mask_token = token
    return tokenizer
