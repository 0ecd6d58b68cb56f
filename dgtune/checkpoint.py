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


def write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically (a temporary file, then a rename)."""
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int = 2,
                    trainable: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write `checkpoints/step_<N>` via a temporary folder and a rename, then point `checkpoints/latest` at it and
    keep the newest `keep` checkpoints (0 = all). A failed write (disk full, non-finite weights) removes the
    temporary folder and leaves every earlier checkpoint as it was. Sharded runs (`dgtune.sharded`) pass the whole
    trainable tensors (`trainable`, written as trainable.safetensors) and the optimizer's full state."""
    from dgtune.errors import SaveError

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_weights(model, tokenizer, tmp / "weights")
        if trainable is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        fix_modes(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"writing checkpoint {final} failed ({e}); the earlier checkpoints are untouched") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    others = sorted(p for p in root.glob("step_*") if p != final)
    for old in others[: max(len(others) - (keep - 1), 0)] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fix_modes(folder: Path) -> None:
    """Give every file under `folder` the usual mode (0644 under the default umask): some writers (safetensors,
    mkstemp) create 0600 files, unreadable by the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def check_finite(model) -> None:
    """Raise NonFiniteError naming the first trainable tensors that hold NaN or Inf (never save such weights)."""
    from dgtune.errors import NonFiniteError

    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"{len(bad)} trainable tensor(s) hold NaN/Inf (first: {bad[0]}); not saved, the earlier "
                             "checkpoints are untouched (lower trainer.lr, or trainer.on_nonfinite=skip)")


def save_weights(model, tokenizer, path: Path) -> None:
    """PEFT adapter (adapter_model.safetensors) for LoRA runs, full safetensors model otherwise; plus tokenizer.
    Refuses (NonFiniteError) weights with NaN/Inf, before writing anything; files are written 0644."""
    check_finite(model)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    fix_modes(path)


CHECKPOINT_FILES = ("state.json", "optimizer.pt", "scheduler.pt", "rng.pt")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (a missing file, an unreadable state.json or
    weights header), or None when it looks complete and loadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        return "folder missing"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} missing"
    try:
        json.loads((path / "state.json").read_text())["step"]
    except (ValueError, KeyError) as e:
        return f"state.json unreadable ({e})"
    weights = [path / "weights" / n for n in ("adapter_model.safetensors", "model.safetensors")]
    weights = [w for w in weights if w.is_file()]
    if not weights:
        return "weights/ has no adapter_model.safetensors or model.safetensors"
    try:
        with safe_open(str(weights[0]), "pt"):
            pass
    except Exception as e:  # truncated or corrupted
        return f"{weights[0].name} unreadable ({e})"
    return None


def checkpoint_candidates(run_dir: Path) -> list[tuple[Path, str | None]]:
    """[(checkpoint folder, problem or None)], newest first: the folder `checkpoints/latest` names (even if it is
    gone), then the older `step_*` folders; without a `latest` file, every `step_*` folder. Folders newer than
    the one `latest` names are not candidates (a run rolled back by pointing `latest` at an older checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    folders = sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        folders = [named] + [p for p in folders if p.name < named.name]
    return [(p, checkpoint_problem(p)) for p in folders]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (see `checkpoint_problem`), or None."""
    return next((p for p, problem in checkpoint_candidates(run_dir) if problem is None), None)


def load_checkpoint(path: Path, model, optimizer, scheduler, sharded=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the saved state (with `step`). With
    `sharded` (`dgtune.sharded.Sharded`), each process takes its shards of the weights and optimizer state."""
    path = Path(path)
    weights = path / "weights"
    if sharded is not None:
        sharded.load(path, optimizer)
    elif (weights / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(weights / "adapter_model.safetensors")))
    else:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(weights / "model.safetensors")), strict=False)
        if unexpected:
            raise RuntimeError(f"checkpoint {weights} has unexpected tensors: {unexpected[:5]}")
    if sharded is None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "state.json").read_text())


def resume_state(run_dir, model, optimizer, scheduler, print_fn=print, sharded=None) -> dict:
    """Load the newest complete and loadable checkpoint of `run_dir`, saying which newer ones were skipped and
    why; CheckpointError (listing every reason) when none loads."""
    skipped = []
    for ckpt, problem in checkpoint_candidates(run_dir):
        if problem is None:
            try:
                state = load_checkpoint(ckpt, model, optimizer, scheduler, sharded)
            except Exception as e:  # e.g. a truncated optimizer.pt
                problem = f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if problem is not None:
            skipped.append(f"{ckpt.name}: {problem}")
            print_fn(f"[dgtune] skipping checkpoint {ckpt}: {problem}")
            continue
        return {**state, "checkpoint": str(ckpt), "skipped": skipped}
    from dgtune.errors import CheckpointError

    raise CheckpointError(f"resume=true but {run_dir}/checkpoints has no complete checkpoint"
                          + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
