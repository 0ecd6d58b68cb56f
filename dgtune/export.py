"""`python -m dgtune.export RUN_DIR OUT_DIR [--merge]`: package a run's adapter, or merge it into a standalone model.

Without `--merge` the PEFT adapter (adapter_config.json + adapter_model.safetensors) and tokenizer are copied.
With `--merge`: DiffusionGemma's encoder and decoder share tied base weights but get separate adapters, so
merging both deltas into the shared tensors would be wrong. The base is therefore untied first (every shared
tensor gets its own copy), each adapter is merged into its own copy, and `tie_word_embeddings=False` is saved.
The merged model is larger than the base but gives the same outputs as base + adapter. A run trained on a
quantised base (`model.quantization`) is merged into the unquantised base weights.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def untie_shared_parameters(model: torch.nn.Module) -> int:
    """Give every parameter that appears under several names its own copy; returns how many were untied."""
    seen: dict[int, str] = {}
    to_untie = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            to_untie.append(name)
        else:
            seen[id(param)] = name
    for name in to_untie:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().clone()))
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "text_config"):
        model.config.text_config.tie_word_embeddings = False
    return len(to_untie)


def merge_adapter(base_model, adapter_dir: str):
    """Untie the base, load the adapter, and merge it; returns a plain DiffusionGemmaForBlockDiffusion."""
    from peft import PeftModel

    untie_shared_parameters(base_model)
    return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point."""
    from omegaconf import OmegaConf

    from dgtune.models.load import load_model

    argv = list(sys.argv[1:] if argv is None else argv)
    merge = "--merge" in argv
    args = [a for a in argv if a != "--merge"]
    if len(args) != 2:
        print(__doc__)
        raise SystemExit(2)
    run_dir, out = Path(args[0]), Path(args[1])
    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        raise FileNotFoundError(f"{final} has no adapter_config.json: not a finished LoRA run")
    if not merge:
        shutil.copytree(final, out, dirs_exist_ok=True)
        print(f"[dgtune] adapter copied to {out}")
        return out
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.model.quantization = None  # merge into the 16-bit base (a 4-bit / 8-bit run's adapter was trained on it)
    base, tokenizer = load_model(cfg.model)
    merged = merge_adapter(base, str(final))
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    print(f"[dgtune] merged model written to {out}")
    return out


if __name__ == "__main__":
    main()
