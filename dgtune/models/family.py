"""Model families: what dgtune must know of a diffusion-LM family, in one small profile per family.

A profile holds the facts that differ between families: how to recognise the family from a model's config (the
architecture first, then `model_type`: two families may share a model type), the transformers class that loads it,
the LoRA target pattern (attention and dense-MLP linears, anchored so that output heads are never hit), the MoE
router parameters a full fine-tune keeps frozen, and the modules a 4-bit / 8-bit load keeps in 16 bits. Each family
joins `FAMILIES` where it is defined (`register_family`), in its own module of `dgtune/models/families/` that also
holds its model calls (`calls`); DiffusionGemma (`families/diffusion_gemma.py`) is the first. The next family is one
new module there, not an edit of every module that loads, wraps, quantises, trains or samples a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """One family's facts (see the module docstring)."""

    name: str
    architectures: tuple[str, ...]  # config.architectures values (checked first)
    model_types: tuple[str, ...]  # config.model_type values
    model_class: str  # the transformers class that loads a checkpoint of this family
    lora_target_modules: str  # peft regex over module names: the linears LoRA adapts by default
    router_param: str | None = None  # substring of the MoE router's parameter names (frozen in a full fine-tune)
    quant_skip_modules: tuple[str, ...] = ()  # module-name suffixes kept 16-bit by bitsandbytes loads
    noise: str = "uniform"  # the noise the family was trained with ("uniform" random tokens or "mask")
    calls: str = ""  # the module with the family's model calls (encode, decode_hidden, ...; see model_calls)
    fused_decoder: bool = False  # whether dgtune.sampling.fused_decoder implements the family's decoder
    remote_code: bool = False  # the real checkpoints' class ships with them (`model.trust_remote_code=true` needed)
    self_conditioning: bool = False  # the family's base reads the previous step's logits (as it was trained)
    expert_parameters: tuple[str, ...] = ()  # the routed experts' 3-D parameters (`lora.experts=true` adapts them)
    shard_units: tuple[str, ...] = ()  # class names of the layers FSDP2 shards as units (`trainer.strategy=fsdp2`)
    # `trainer.gradient_checkpointing`: transformers' own activation checkpointing covers the layers that the
    # family's `encoder_layers` call leaves out (DiffusionGemma's decoder layers); dgtune checkpoints those itself
    hf_checkpointing: bool = False
    # block diffusion (`families/llada2.py`): blocks at absolute positions, block-causal attention; trained on
    # [x_t ; x_0] (the loss hands `decode_hidden` the clean canvas) and sampled a block at a time (`sampling.block`)
    block_diffusion: bool = False
    # the checkpoints' [MASK] id, for a tokenizer that does not name its mask token (`load_model` sets it)
    mask_token_id: int | None = None

    def load_class(self):
        """The transformers class named by `model_class`."""
        import transformers

        return getattr(transformers, self.model_class)


FAMILIES: dict[str, ModelFamily] = {}  # family name -> profile


def register_family(family: ModelFamily) -> ModelFamily:
    """Add `family` to `FAMILIES` (by its name); returns it."""
    FAMILIES[family.name] = family
    return family


def discover() -> None:
    """Import every module of `dgtune.models.families`, so that each registers its family."""
    import importlib
    import pkgutil
    from pathlib import Path

    for info in pkgutil.iter_modules([str(Path(__file__).parent / "families")]):
        importlib.import_module(f"dgtune.models.families.{info.name}")


def family_of(model_or_config) -> ModelFamily:
    """The family of a model (peft-wrapped or not) or of its config: by architecture first, then by model type;
    a clear error names what was found and the families dgtune knows."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(model_or_config, "get_base_model"):  # a peft wrapper
        config = model_or_config.get_base_model().config
    architectures = tuple(getattr(config, "architectures", None) or ())
    if not architectures and hasattr(model_or_config, "config"):
        base = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
        architectures = (type(base).__name__,)
    model_type = getattr(config, "model_type", None)
    for attempt in range(2):
        for fam in FAMILIES.values():
            if set(architectures) & set(fam.architectures):
                return fam
        for fam in FAMILIES.values():
            if model_type in fam.model_types:
                return fam
        if attempt == 0:
            discover()
    known = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())
    from dgtune.errors import InputError

    raise InputError(f"model architecture {list(architectures)} / model_type {model_type!r} is not a family dgtune "
                     f"supports (known: {known})")
