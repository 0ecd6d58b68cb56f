"""`model.backend=unsloth`: load the base through unsloth's diffusion loader (`pip install "dgtune[unsloth]"`, CUDA).

Only the loading goes through unsloth: `FastDiffusionModel.from_pretrained` (unsloth 2026.10's transformers-only
"slow path" for text-diffusion models) returns the unmodified transformers `DiffusionGemmaForBlockDiffusion`,
with NF4 / 8-bit through bitsandbytes when `model.quantization` asks (its own skip list: LM head, embedding,
experts, self-conditioning, router), on this process's GPU. dgtune then applies its own LoRA, gradient
checkpointing, objective, sampler and eval, exactly as with `model.backend=transformers`.

unsloth 2026.10.9 requires transformers <= 5.17 and datasets < 5 (and excludes datasets 4.0.*, 4.1.0, 4.4.*,
4.5.0), so it needs its own environment at the low end of dgtune's ranges (`pip install "dgtune[unsloth]"` resolves
there). It refuses to run without an accelerator; so does this backend, at once. Untested on a GPU here.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("transformers", "unsloth")


class BackendUnavailableError(RuntimeError):
    """`model.backend` names a loader that cannot run on this machine."""


def check_backend(cfg) -> str:
    """Validate `model.backend` before anything is loaded; returns it. unsloth: pretrained / bundled sources only,
    a CUDA GPU and an importable unsloth, else one line naming `model.backend`."""
    backend = str(cfg.get("backend") or "transformers")
    if backend not in BACKENDS:
        raise ValueError(f"model.backend must be 'transformers' or 'unsloth', got {backend!r}")
    if backend == "transformers":
        return backend
    if cfg.source not in ("pretrained", "bundled"):
        raise ValueError(f"model.backend=unsloth loads saved models (model.source pretrained or bundled), "
                         f"not model.source={cfg.source!r}")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("model.backend=unsloth needs a CUDA GPU (unsloth's loader has no CPU path) "
                                      "and this machine has none; use model.backend=transformers")
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or unsloth's own refusal at import
        raise BackendUnavailableError(
            f"model.backend=unsloth: cannot import unsloth ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "install it in its own environment: pip install 'dgtune[unsloth]'") from exc
    return backend


def load_with_unsloth(path: str, cfg, dtype: torch.dtype):
    """Load `path` through `unsloth.FastDiffusionModel.from_pretrained` on this process's GPU (LOCAL_RANK);
    returns (model, tokenizer). Call `check_backend` first."""
    from unsloth import FastDiffusionModel

    from dgtune.models.quant import quant_mode

    mode = quant_mode(cfg.get("quantization"))
    model, processor = FastDiffusionModel.from_pretrained(
        path,
        dtype=dtype,
        load_in_4bit=mode is not None and mode.name == "4bit",
        load_in_8bit=mode is not None and mode.name == "8bit",
        device_map={"": int(os.environ.get("LOCAL_RANK", "0"))},
        attn_implementation=cfg.get("attn_implementation") or None,
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
        use_safetensors=True,
    )
    return model, getattr(processor, "tokenizer", processor)  # DiffusionGemma's processor wraps the tokenizer
