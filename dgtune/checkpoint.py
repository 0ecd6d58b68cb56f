"""Atomic training checkpoints: weights (PEFT adapter or full model), optimizer, scheduler, RNG and step."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    """Write `checkpoints/step_<N>` via a temporary folder and a rename, then point `checkpoints/latest` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tokenizer, tmp / "weights")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p != final)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(model, tokenizer, path: Path) -> None:
    """PEFT adapter (adapter_model.safetensors) for LoRA runs, full safetensors model otherwise; plus tokenizer."""
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` points at, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the saved state (with `step`)."""
    path = Path(path)
    weights = path / "weights"
    if (weights / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(weights / "adapter_model.safetensors")))
    else:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(weights / "model.safetensors")), strict=False)
        if unexpected:
            raise RuntimeError(f"checkpoint {weights} has unexpected tensors: {unexpected[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "state.json").read_text())
