"""Benchmark: training tokens/s and peak memory of one dgtune step at a 262,144-token vocabulary (not a test).

    OMP_NUM_THREADS=1 python eval/bench/bench_train.py [--builder dgtune.models.shaped:build_shaped_model] [--batch 4]
        [--prompt 24] [--canvas 32] [--steps 3] [--chunks 128,32,256] [--device cpu|cuda] [--objective released]

One LoRA training step (configs/lora/default.yaml targets, the released objective with self-conditioning on every
example and the AR co-loss: loss, backward, AdamW step) on a 26B-shaped DiffusionGemma (`--builder module:function`
returning (model, tokenizer); default the 262,144-vocabulary `dgtune.models.shaped.build_shaped_model`), a synthetic
right-padded batch of random token ids (prompt `--prompt` +- 4 tokens, canvas `--canvas`). Rows:

- plain: TRL's objective as a plain implementation computes it: full float32 soft-capped logits for the canvas
  (both passes) and the encoder, no checkpointing. This is dgtune's own path with `objective.loss_chunk=0`, which
  tests/test_objective.py checks against two `model.forward()` calls (the TRL-style reference).
- chunked loss: `objective.loss_chunk=C` for each C in `--chunks` (the first is the one in the summary line).
- chunked loss + checkpointing: also `trainer.gradient_checkpointing=true`.
- 4-bit: chunked loss + checkpointing on the same weights re-loaded as `model.quantization=4bit` loads them
  (`dgtune.models.quant`: NF4, double quant, bf16 compute, layer linears quantised, experts 16-bit), bf16
  autocast; where bitsandbytes has a working 4-bit backend on `--device` (bitsandbytes 0.50.2 has one on CPU: checked here),
  else a skipped row saying why.

Each configuration runs in its own subprocess: one untimed warm-up step, then `--steps` timed steps (median).
Memory: on CPU the peak RSS (`ru_maxrss`, with the kernel's high-water mark reset after loading where
/proc/self/clear_refs allows) and its part above the RSS right after loading the model (the training step's part:
activations, logits, gradients, optimizer state); on CUDA `torch.cuda.max_memory_allocated` and its part above
the memory allocated after loading. Tokens/s counts real prompt+response tokens plus canvas tokens per step, as
dgtune.train does. Last line: `train_speed_ratio=X.XX mem_ratio=Y.YY` (chunked loss at the first chunk size, no
checkpointing, against plain: tokens/s ratio, and the ratio of the training-step memory parts).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak RSS of this process so far (MiB): `ru_maxrss` (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (what `ru_maxrss` reads) to the current RSS, where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def synthetic_batch(vocab_ids: int, b: int, prompt: int, canvas: int, seed: int = 0) -> dict:
    """A right-padded training batch like `dgtune.data.collate_train`'s: prompts of prompt-4 .. prompt+4 random ids
    (7 <= id < vocab_ids, the tokenizer's ordinary tokens), then a canvas of random ids ending in EOS (1)."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(max(prompt - 4, 1), prompt + 5, (b,), generator=g)  # [b]
    s = int(plen.max()) + canvas
    ids = torch.randint(7, vocab_ids, (b, s), generator=g)  # [b, s]
    am = (torch.arange(s)[None] < (plen + canvas)[:, None]).long()  # [b, s]
    ids = torch.where(am.bool(), ids, 0)
    ids[torch.arange(b), plen + canvas - 1] = 1
    canvas_ids = torch.stack([ids[i, p:p + canvas] for i, p in enumerate(plen.tolist())])  # [b, l]
    return {"input_ids": ids, "attention_mask": am, "prompt_len": plen, "canvas": canvas_ids}


def worker(args) -> dict:
    """Run one configuration in this process; returns its figures."""
    from omegaconf import OmegaConf

    from dgtune.diffusion.loss import denoising_loss
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.models.checkpointing import enable_gradient_checkpointing
    from dgtune.train import apply_lora

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    module, fn = args.builder.split(":")
    model, tok = getattr(importlib.import_module(module), fn)()
    if args.four_bit:  # same weights re-loaded with dgtune's 4-bit base (model.quantization=4bit)
        from dgtune.models.quant import quantised_copy

        model = quantised_copy(model, "4bit")
    elif cuda:
        model = model.cuda()
    lora = OmegaConf.load(ROOT / "configs/lora/default.yaml")
    model = apply_lora(model, lora)
    if args.ckpt:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.get_base_model().config.text_config.vocab_size
    batch = synthetic_batch(len(tok) - 1, args.batch, args.prompt, args.canvas)
    device = "cuda" if cuda else "cpu"
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum()) + batch["canvas"].numel()
    from dgtune.config import compose

    # composed as dgtune.train composes it (the group files name only what differs from the schema's defaults)
    cfg = ObjectiveConfig(**OmegaConf.to_container(compose([f"objective={args.objective}"]).objective, resolve=True))
    cfg.self_cond_p, cfg.loss_chunk = 1.0, args.chunk

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base, reset = rss_mib(), reset_peak_rss()
    autocast = torch.autocast(device, torch.bfloat16, enabled=args.bf16 or args.four_bit)

    def step(i: int) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = denoising_loss(model, batch, cfg, torch.Generator(device).manual_seed(i), vocab, tok.mask_token_id)
        out["loss"].backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(0)  # warm-up, untimed
    times = [step(i + 1) for i in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    return {"tok_s": tokens / statistics.median(times), "step_s": statistics.median(times), "peak_mib": peak,
            "base_mib": base, "step_mib": peak - base, "tokens": tokens,
            "peak_reset": True if cuda else reset}


def run_row(args, chunk: int, ckpt: bool, four_bit: bool = False) -> dict:
    """One configuration in a fresh subprocess (so its peak memory is its own)."""
    cmd = [sys.executable, __file__, "--worker", "--chunk", str(chunk), "--builder", args.builder,
           "--batch", str(args.batch), "--prompt", str(args.prompt), "--canvas", str(args.canvas),
           "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device,
           "--objective", args.objective] + (["--ckpt"] if ckpt else []) + (["--four-bit"] if four_bit else []) \
        + (["--bf16"] if args.bf16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments; as `--worker` run one configuration, else every row and the summary line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builder", default="dgtune.models.shaped:build_shaped_model",
                   help="module:function returning (model, tokenizer)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=24)
    p.add_argument("--canvas", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", default="128,32,256", help="loss_chunk sizes; the first is the summary line's")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--objective", default="released", choices=["released", "mean_loo", "masked"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as trainer.mixed_precision=bf16)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--four-bit", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    chunks = [int(c) for c in args.chunks.split(",")]
    unit = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"[bench_train] builder={args.builder} batch={args.batch} prompt~{args.prompt} canvas={args.canvas} "
          f"objective={args.objective} (self_cond_p=1, LoRA) steps={args.steps} threads={args.threads} "
          f"device={args.device}{' bf16 autocast' if args.bf16 else ''}; memory: {unit}")
    rows = [("plain (full logits, no checkpointing)", run_row(args, 0, False))]
    rows += [(f"chunked loss (loss_chunk={c})", run_row(args, c, False)) for c in chunks]
    rows.append((f"chunked loss + checkpointing (loss_chunk={chunks[0]})", run_row(args, chunks[0], True)))
    from dgtune.models.quant import QUANT_MODES, backend_problem

    why = backend_problem(QUANT_MODES["4bit"], args.device)
    four_bit = why is None
    if four_bit:
        rows.append((f"4-bit + chunked loss + checkpointing (loss_chunk={chunks[0]})",
                     run_row(args, chunks[0], True, four_bit=True)))
    print(f"{'configuration':58s} {'tokens/s':>9s} {'step s':>7s} {'peak MiB':>9s} {'after load':>10s} {'step MiB':>9s}")
    for name, r in rows:
        print(f"{name:58s} {r['tok_s']:9.1f} {r['step_s']:7.2f} {r['peak_mib']:9.0f} {r['base_mib']:10.0f} "
              f"{r['step_mib']:9.0f}" + ("" if r["peak_reset"] else "  (peak not reset after load)"))
    if not four_bit:
        print(f"{'4-bit + chunked loss + checkpointing':58s} skipped: {why}")
    plain, chunked = rows[0][1], rows[1][1]
    print(f"train_speed_ratio={chunked['tok_s'] / plain['tok_s']:.2f} mem_ratio={chunked['step_mib'] / plain['step_mib']:.2f}")


if __name__ == "__main__":
    main()
