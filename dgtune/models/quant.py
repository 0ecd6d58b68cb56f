"""4-bit / 8-bit base weights through bitsandbytes (`model.quantization: null | 4bit | 8bit`, QLoRA).

What gets quantised on DiffusionGemma: bitsandbytes replaces `nn.Linear` modules only. Quantised here: every
attention projection (q/k/v/o) and dense-MLP projection (gate/up/down) of the encoder and decoder layers, the
decoder's self-conditioning MLP and the vision tower's linears. Left in 16-bit: the MoE experts (`gate_up_proj`,
`down_proj` are 3-D `nn.Parameter`s inside one module, not `nn.Linear`; about 90% of the 26B's parameters), the
embedding (an `nn.Embedding`, tied to the LM head, which is skipped on purpose), the router's projection (skipped
on purpose: routing decisions stay exact; 0.04% of the 26B) and every norm / scale.

The skip list is dgtune's own (`SKIP_MODULES`). transformers' default (`get_keys_to_not_convert`) skips every key
of `model.all_tied_weights_keys`, and DiffusionGemma ties each encoder layer weight to its decoder layer, so by
default not one layer linear is quantised (only the vision tower and the self-conditioning gate/up). With an
explicit `llm_int8_skip_modules` transformers applies no default skips; the encoder and decoder layers then hold
the same `Params4bit` / `Int8Params` object (tied after loading; `tests/test_quant.py` checks it).

peft's `prepare_model_for_kbit_training` is not used: it casts every non-quantised parameter to float32, which on
the 26B would be the 22.8 B expert parameters (85 GiB). Here the base stays frozen in `model.dtype`, the LoRA
parameters are float32 (peft's default), and gradient checkpointing is non-reentrant, so no input needs
`requires_grad`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch

from dgtune.models.families.diffusion_gemma import DIFFUSION_GEMMA
from dgtune.models.family import family_of

SKIP_MODULES = list(DIFFUSION_GEMMA.quant_skip_modules)  # DiffusionGemma's: suffix matches (should_convert_module)


class QuantizationUnavailableError(RuntimeError):
    """`model.quantization` was asked for but bitsandbytes or its backend is not usable here."""


@dataclass(frozen=True)
class QuantMode:
    """One `model.quantization` value: the `BitsAndBytesConfig` keywords and the bitsandbytes module it produces."""

    name: str
    bnb_module: str
    kwargs: dict = field(default_factory=dict)


QUANT_MODES = {
    "4bit": QuantMode("4bit", "Linear4bit", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.bfloat16)),
    "8bit": QuantMode("8bit", "Linear8bitLt", dict(load_in_8bit=True)),
}


def quant_mode(value) -> QuantMode | None:
    """The `QuantMode` of a `model.quantization` value (None, 'none' or 'null' -> None); unknown -> ValueError."""
    if value in (None, "none", "null", False):
        return None
    if str(value) not in QUANT_MODES:
        raise ValueError(f"model.quantization must be null, '4bit' or '8bit', got {value!r}")
    return QUANT_MODES[str(value)]


def backend_problem(mode: QuantMode, device: str) -> str | None:
    """Why `mode` cannot run on `device` here (None when it can): bitsandbytes missing, or its backend failing on
    a small real quantise / matmul on that device."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install -e '.[bnb]')"
    try:
        x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
        if mode.name == "4bit":
            w = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to(device)
            out = bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
            out = layer(x)
        if out.shape != (4, 64) or not torch.isfinite(out.float()).all():
            return f"bitsandbytes {bnb.__version__} gave a wrong result on {device}"
    except Exception as exc:  # noqa: BLE001 - any backend failure means "not usable here"
        return f"bitsandbytes {bnb.__version__} has no working {mode.name} backend on {device} " \
               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def default_device_map() -> dict:
    """Where a quantised base is loaded: this process's GPU (LOCAL_RANK under accelerate / torchrun), else CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def bnb_config(value, skip_modules=None):
    """The `BitsAndBytesConfig` for `model.quantization` (None when unquantised), keeping `skip_modules` (the model
    family's `quant_skip_modules`; DiffusionGemma's by default) in 16 bits. Fails at once with one line naming
    `model.quantization` when bitsandbytes or its backend is not usable on this machine's device."""
    mode = quant_mode(value)
    if mode is None:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = backend_problem(mode, device)
    if problem:
        raise QuantizationUnavailableError(f"model.quantization={mode.name}: {problem}")
    from transformers import BitsAndBytesConfig

    skip = SKIP_MODULES if skip_modules is None else skip_modules
    return BitsAndBytesConfig(**mode.kwargs, llm_int8_skip_modules=list(skip))


def quantised_summary(model) -> dict[str, int]:
    """Parameters of `model` (each shared tensor once) by storage: 'quantised' (elements of the original weights of
    bitsandbytes modules), 'experts_16bit' (3-D expert parameters), 'other_16bit' (embedding, norms, router, ...)."""
    import bitsandbytes as bnb

    out = {"quantised": 0, "experts_16bit": 0, "other_16bit": 0}
    seen = set()
    qtypes = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, qtypes) and name == "weight":
                out["quantised"] += module.in_features * module.out_features
            elif p.dim() == 3:
                out["experts_16bit"] += p.numel()
            else:
                out["other_16bit"] += p.numel()
    return out


def quantised_copy(model, value, **kwargs):
    """`model` (e.g. a freshly built shaped or tiny model) re-loaded with a quantised base: saved as safetensors to
    a temporary folder, then `from_pretrained` with `bnb_config(value)` (same weights, same tying)."""
    family = family_of(model)
    q = bnb_config(value, family.quant_skip_modules)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return family.load_class().from_pretrained(
            tmp, quantization_config=q, device_map=default_device_map(), use_safetensors=True, **kwargs)


def dense_weight(linear) -> torch.Tensor:
    """The weight matrix [out, in] an `nn.Linear` or bitsandbytes linear applies (dequantised: NF4 blocks times
    their absmax; int8 rows times their scale / 127), for code that reads weights directly (the fused decoder)."""
    w = linear.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(w.data, w.quant_state)
    if kind == "Int8Params":
        import bitsandbytes.functional as F

        scb = w.SCB if getattr(w, "SCB", None) is not None else linear.state.SCB
        return F.int8_vectorwise_dequant(w.data, scb)
    return w
