"""Memory under FSDP2 (`trainer.strategy=fsdp2`): measured per process on 2 CPU processes against `dgtune.memory`'s
prediction, for the 26B-shaped model of eval/bench/memory_plan.py (not a test).

    OMP_NUM_THREADS=1 python eval/bench/memory_fsdp2.py [--steps 2]

For each setting (LoRA on the default targets, LoRA + experts, full fine-tune with self_cond_p=0) a
`torchrun --nproc_per_node 2` worker builds the measured model in fp32, wraps `DenoisingLoss`, shards it with
`dgtune.sharded.Sharded` (the main process keeps its unsharded replica), and runs one warm-up and `--steps` steps
(chunked loss 32, batch 4 per process, prompt ~48, canvas 32). Each process reports:

- weights: the bytes of its parameters as they are held (its shards, the untied layer copies, the main process'
  replica in host memory), counted from the tensors: on a CPU the RSS after sharding still holds the freed
  unsharded model (glibc keeps it), so RSS cannot show it;
- step: its peak RSS during a step (the high-water mark reset before each; the largest of `--steps` steps after
  two warm-ups) minus its RSS before it, against the predicted activations + logits + adapter/optimizer states +
  the gathered units (a layer and the next, and the root: embedding / LM head, self-conditioning MLP) + the CPU
  overhead fitted by eval/bench/memory_plan.py on its first setting (`--overhead-mib`, default: fitted now).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval" / "bench"))

SETTINGS = [("LoRA r16", "lora"), ("LoRA r16 + experts", "experts"), ("full fine-tune (sc 0)", "full")]
BATCH, PROMPT, CANVAS, CHUNK = 4, 48, 32, 32


def worker(kind: str, steps: int) -> dict:
    """One process of the 2-process run (under torchrun)."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from bench_train import peak_rss_mib, reset_peak_rss, rss_mib, synthetic_batch
    from dgtune.config import compose
    from dgtune.diffusion.loss import DenoisingLoss
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.models.family import family_of
    from dgtune.sharded import Sharded, full_grad_norm_clip
    from dgtune.train import apply_lora
    from memory_plan import build_measured_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tok = build_measured_model()
    vocab = model.config.text_config.vocab_size
    if kind != "full":
        lora = OmegaConf.merge(OmegaConf.load(ROOT / "configs/lora/default.yaml"), {"experts": kind == "experts"})
        model = apply_lora(model, lora)
    model.train()
    cfg = ObjectiveConfig(**OmegaConf.to_container(compose(["objective=released"]).objective, resolve=True))
    cfg.self_cond_p, cfg.loss_chunk = (0.0 if kind == "full" else 1.0), CHUNK
    module = DenoisingLoss(model, cfg, vocab, tok.mask_token_id)
    sharded = Sharded(module, family_of(model).shard_units, rank == 0, "cpu")
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in module.parameters())
    replica = sum(p.numel() * p.element_size() for p in sharded.replica.parameters()) if sharded.replica else 0
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    batch = synthetic_batch(len(tok) - 1, BATCH, PROMPT, CANVAS, seed=rank)
    step_mib, reset = [], True
    for i in range(steps + 2):  # two warm-up steps (AdamW states, allocator), then the measured ones
        reset = reset_peak_rss() and reset
        before = rss_mib()
        opt.zero_grad(set_to_none=True)
        out = module(batch, torch.Generator().manual_seed(i))
        out["loss"].backward()
        full_grad_norm_clip(trainable, 1.0)
        opt.step()
        step_mib.append(peak_rss_mib() - before)
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "weights_mib": (local + replica) / 2**20, "step_mib": max(step_mib[2:]),
            "peak_reset": reset, "untied": sharded.untied}


def predict(kind: str, main: bool, overhead_mib: float) -> dict:
    """Predicted resident weights (shards, untied copies, the main process' replica) and step part (MiB)."""
    from dgtune.memory import MIB, TrainSettings, layer_parameters, parameter_counts, predict_memory
    from memory_plan import measured_shape, step_part

    shape = measured_shape()
    st = TrainSettings(batch=BATCH, prompt=PROMPT, canvas=CANVAS, loss_chunk=CHUNK, weight_bytes=4, act_bytes=4,
                       gpus=2, lora_experts=kind == "experts", full_finetune=kind == "full",
                       fsdp2_untied=kind != "full")
    pr = predict_memory(shape, st, overhead=overhead_mib * MIB)
    n = sum(parameter_counts(shape).values())
    shards = (n + (layer_parameters(shape) if st.fsdp2_untied else 0)) * 4 / 2  # this process' half, untied copies in
    resident = shards + pr["lora_params"] + (n * 4 + pr["lora_params"] * 2 if main else 0)
    gathered = pr["weights"] - shards
    return {"weights_mib": resident / MIB, "step_mib": (step_part(pr) + gathered) / MIB}


def main() -> None:
    """Run each setting under torchrun and print the table (or, with --worker, be one process)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--overhead-mib", type=float, default=None,
                   help="the CPU runtime overhead fitted by eval/bench/memory_plan.py (default: fit it now)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = worker(args.worker, args.steps)
        Path(f"{args.out}.{res['rank']}").write_text(json.dumps(res))
        return
    overhead = args.overhead_mib
    if overhead is None:
        import memory_plan

        overhead = memory_plan.fit_overhead() / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(f"[fsdp2 memory] measured 26B-shaped model ({'vocab 262144, fp32'}), 2 CPU processes (gloo), batch "
          f"{BATCH}/process, prompt ~{PROMPT}, canvas {CANVAS}, loss_chunk {CHUNK}; CPU overhead {overhead:.0f} MiB")
    print(f"{'setting':24s} {'process':>7s} | {'weights pred':>12s} {'meas':>7s} {'err %':>6s} | "
          f"{'step pred':>9s} {'meas':>7s} {'err %':>6s}")
    for name, kind in SETTINGS:
        out = Path(f"/tmp/dgtune_fsdp2_mem_{kind}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", kind, "--steps", str(args.steps), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        for rank in (0, 1):
            got = json.loads(Path(f"{out}.{rank}").read_text())
            pr = predict(kind, rank == 0, overhead)
            label = "main" if rank == 0 else "other"
            print(f"{name:24s} {label:>7s} | {pr['weights_mib']:12.0f} {got['weights_mib']:7.0f} "
                  f"{100 * (pr['weights_mib'] - got['weights_mib']) / got['weights_mib']:+6.1f} | "
                  f"{pr['step_mib']:9.0f} {got['step_mib']:7.0f} "
                  f"{100 * (pr['step_mib'] - got['step_mib']) / got['step_mib']:+6.1f}")


if __name__ == "__main__":
    main()
