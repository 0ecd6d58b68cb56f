"""`trainer.strategy=fsdp2`: fully sharded data parallel training (torch's FSDP2, `fully_shard`), one shard unit per
layer (the family profile's `shard_units`) and the method's loss module as the root unit. DiffusionGemma's encoder
layer i and decoder layer i share their weights: with LoRA the shared (frozen) weights are copied so that each layer
is its own unit (`untie_frozen_shared`); in a full fine-tune the pair is one grouped unit (`shard_groups`).

Why `fully_shard` directly and not accelerate's FSDP plugin: accelerate 1.15 turns FSDP into DDP on CPUs (so it
could not be proven here on 2 gloo processes) and would wrap the model, not the loss; dgtune's loss module calls the
encoder and decoder directly (`dgtune.diffusion.model_calls`), which FSDP2 allows as long as every call runs inside
the root unit's forward (the loss) or inside a layer unit. The mixed precision stays accelerate's autocast, as in
DDP: the same numbers as a 1-process run.

Everything that reads weights outside a training step (quick evals, checkpoints, the final adapter or model, the
end-of-run report) reads whole tensors:

- `Sharded.replica`: on the main process an unsharded copy of the loss module, made before sharding (the model is
  loaded in host memory; `fully_shard` moves each process' shards to its device) and kept in host memory; `sync()`
  (a collective: every process calls it) gathers the trainable tensors in full (`get_model_state_dict(...,
  full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)`: for LoRA only the adapter travels) and copies
  them into it. Saving reads it where it is; an eval (`full_weights()`) moves it to the main process' device for the
  eval and back. So a saved adapter has every tensor at full shape, and the main device holds the unsharded model
  only while it samples (`eval/bench/memory_plan.py`: the FSDP2 rows).
- Checkpoints add `trainable.safetensors` (the full trainable tensors by their names in the loss module) and save
  the optimizer's full state (`get_optimizer_state_dict(..., full_state_dict=True)`); a resume gives each process
  its shards of both (`set_model_state_dict` / `set_optimizer_state_dict`), so it continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

TRAINABLE_FILE = "trainable.safetensors"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class Sharded:
    """The loss module sharded with FSDP2 and, on the main process, its unsharded replica (module docstring)."""

    def __init__(self, module: torch.nn.Module, unit_classes: tuple[str, ...], main: bool, device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not unit_classes:
            raise ValueError("trainer.strategy=fsdp2: the model's family names no shard_units (its layer classes)")
        self.main, self.device = main, torch.device(device)
        # [main] unsharded, for sampling and saving; parked in host memory (it moves to the device only for evals)
        self.replica = copy.deepcopy(module).to("cpu") if main else None
        mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
        untied = untie_frozen_shared(module, unit_classes)
        units = shard_groups(module, unit_classes)
        if not units:
            raise ValueError(f"trainer.strategy=fsdp2: no module of class {', '.join(unit_classes)} in the model")
        for group in units:
            fully_shard(group if len(group) > 1 else group[0], mesh=mesh)
        fully_shard(module, mesh=mesh)  # the root: embeddings, norms, head, and the loss' whole forward
        self.module = module
        self.units, self.untied = len(units), untied
        self.trainable = [n for n, p in module.named_parameters() if p.requires_grad]

    @property
    def model(self):
        """[main] the replica's (peft) model: what sampling, eval and saving read."""
        return self.replica.model if self.replica is not None else None

    def trainable_state(self) -> dict:
        """The trainable tensors in full, by name in the loss module, on the main process ({} elsewhere). Collective."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module, options=_options(cpu_offload=True, ignore_frozen_params=True))
        return {n: state[n] for n in self.trainable if n in state}  # (buffers left out)

    def sync(self) -> dict:
        """Copy the current trainable tensors into the replica (main process). Collective. Returns them."""
        state = self.trainable_state()
        if self.replica is not None:
            missing = set(state) - set(self.replica.state_dict())
            if missing:
                raise RuntimeError(f"trainable tensors missing from the replica: {sorted(missing)[:3]}")
            with torch.no_grad():
                params = dict(self.replica.named_parameters())
                for name, value in state.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
        return state

    @contextlib.contextmanager
    def full_weights(self):
        """Sync the replica (collective), and on the main process move it to the training device for the block
        (sampling runs there), back to host memory after."""
        self.sync()
        moved = self.replica is not None and self.device.type != "cpu"
        if moved:
            self.replica.to(self.device)
        try:
            yield self.model
        finally:
            if moved:
                self.replica.to("cpu")
                torch.cuda.empty_cache() if self.device.type == "cuda" else None

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state in full (keyed by parameter names), on the main process. Collective."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer, options=_options(cpu_offload=True))

    def load(self, checkpoint: Path, optimizer) -> None:
        """Each process takes its shards of a checkpoint's trainable tensors and optimizer state, then the replica
        is synced. Collective."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = Path(checkpoint) / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: the checkpoint was not written by trainer.strategy=fsdp2")
        set_model_state_dict(self.module, load_file(str(path)), options=_options(strict=False))
        osd = torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(self.module, optimizer, osd, options=_options())
        self.sync()


def untie_frozen_shared(module: torch.nn.Module, unit_classes: tuple[str, ...]) -> int:
    """Give each unit its own copy of the frozen parameters it shares with an earlier unit; returns how many.

    FSDP2 can shard two modules that share parameters only as one group (`fully_shard([a, b])`), and torch 2.13
    crashes (a segmentation fault in backward) when a module of such a group runs more than once before backward,
    as DiffusionGemma's decoder layer does (the self-conditioning pass, then the graded pass) while its encoder
    twin ran once (tests/test_fsdp2.py keeps a 30-line reproduction). With LoRA the shared weights are frozen, so a
    copy changes no number: each layer becomes its own unit, at the cost of holding the tied layer weights twice
    (sharded: 2 / N of them per process). Trainable shared parameters (a full fine-tune) stay tied."""
    units = [m for m in module.modules() if type(m).__name__ in unit_classes]
    seen: set[int] = set()
    copies = 0
    for unit in units:
        for sub in unit.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if id(p) in seen and not p.requires_grad:
                    setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                    copies += 1
        seen.update(id(p) for p in unit.parameters())
    return copies


def shard_groups(module: torch.nn.Module, unit_classes: tuple[str, ...]) -> list[list[torch.nn.Module]]:
    """The modules of `unit_classes` in `module`, grouped so that modules sharing a parameter are one shard unit:
    DiffusionGemma's encoder layer i and decoder layer i share their weights (FSDP2 refuses a parameter in two
    units, so the pair is sharded as one, `fully_shard([encoder_i, decoder_i])`)."""
    units = [m for m in module.modules() if type(m).__name__ in unit_classes]
    owner: dict[int, int] = {}  # parameter id -> group index
    groups: list[list[torch.nn.Module]] = []
    for unit in units:
        hits = {owner[id(p)] for p in unit.parameters() if id(p) in owner}
        if len(hits) > 1:
            raise ValueError(f"{type(unit).__name__} shares parameters with {len(hits)} other shard units")
        g = hits.pop() if hits else len(groups)
        if g == len(groups):
            groups.append([])
        groups[g].append(unit)
        for p in unit.parameters():
            owner[id(p)] = g
    return groups


def full_grad_norm_clip(params: list, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over sharded (DTensor) gradients: the norm of the whole gradient, the same on every process."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def ensure_process_group(accelerator) -> None:
    """FSDP2 needs a process group; a single process (tests, one GPU) gets a gloo group of one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if accelerator.num_processes != 1:
            raise RuntimeError("trainer.strategy=fsdp2: several processes but no process group")
        backend = "cpu:gloo,cuda:nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
