"""Profile one decoder forward pass of the bundled tiny DiffusionGemma (not a test): where a sampler step's time goes.

    python eval/bench/profile_decoder.py [--batch 64] [--threads 1] [--reps 6] [--table]

On 9x9 Sudoku-shaped inputs (prompt 91 tokens, canvas 88, self-conditioning logits), times in this process:
transformers' decoder (what `generate()` runs each step) and `dgtune.sampling.fused_decoder.FusedDecoder` in fp32,
bf16 and bf16 + torch.compile (compile time excluded); then transformers' prompt encoder against
`FusedDecoder.encode_prompt` (bf16, compiled), and a roofline line: the decoder's matmul and attention FLOPs against
this machine's measured bf16 matmul peak. Prints ms per forward and the ratio to transformers, and with
`--table` the torch.profiler table of the compiled forward (self time per op: matmuls, attention, fused kernels).
Last, one whole fast-sampler call (`--sample-steps`, default 12) against the forwards and encoding it is made of:
the difference is the step loop's own work.
The ratios bound what the fast sampler can gain at large batch, where the decoder is almost all of a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dgtune.diffusion.model_calls import decode, encode  # noqa: E402
from dgtune.sampling.fast import NO_MASKS  # noqa: E402
from dgtune.sampling.fused_decoder import FusedDecoder  # noqa: E402


def ms_per_call(fn, reps: int) -> float:
    """Mean wall time of fn() in ms over `reps` calls, after two warm-up calls."""
    fn()
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def decoder_flops(dec: FusedDecoder, b: int, p: int, l: int, v: int) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one decoder forward on b canvases of l tokens against a p-token prompt,
    from the weight shapes (MoE: top-k experts per token; self-conditioning MLP, soft embedding and LM head included)."""
    n, hidden = b * l, dec.embed.shape[1]
    per_token = 2 * (dec.sc_gate_up.numel() + dec.sc_down.numel() + dec.lm_head.numel() + v * hidden)
    att = 0.0
    for layer in dec.layers:
        dense = layer.w_qkv.numel() + layer.w_o.numel() + layer.w_gate_up.numel() + layer.w_down.numel()
        experts = dec.top_k * (layer.experts_gate_up[0].numel() + layer.experts_down[0].numel())
        per_token += 2 * (dense + experts + layer.router_proj.numel())
        att += 2 * 2 * layer.q_dim * (p + l)  # q.k and p.v, all heads, per query token
    return n * per_token, n * att


def print_roofline(dec: FusedDecoder, b: int, p: int, l: int, v: int, reps: int) -> None:
    """The decoder's FLOPs against this machine's measured matmul peak (a large bf16 matmul): a lower bound on
    the time of one forward, hence an upper bound on the speedup any sampler can get over transformers' decoder."""
    mm, att = decoder_flops(dec, b, p, l, v)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    peak = 2 * 2048**3 / (ms_per_call(lambda: a @ a, max(reps // 2, 2)) / 1000)
    print(f"[roofline] one decoder forward: {mm / 1e9:.2f} GFLOP of matmuls + {att / 1e9:.2f} GFLOP of attention; "
          f"bf16 matmul peak of this machine (2048^3) {peak / 1e9:.0f} GFLOP/s, so at least "
          f"{(mm + att) / peak * 1000:.1f} ms per forward if every FLOP ran at that peak")


def print_step_overhead(model, prompts, eos: int, pad: int, steps: int, t_forward: float, t_encode: float,
                        reps: int) -> None:
    """One whole fast-sampler call (bf16, compiled, as `eval/bench/bench_sampler.py` runs it) against the decoder forwards
    and prompt encoding it is made of: what is left is the step loop's own work (statistics, acceptance,
    renoising, random numbers, row retirement)."""
    from dgtune.sampling.sampler import SamplerConfig, sample

    cfg = SamplerConfig(mode="fast", max_steps=steps, decoder_dtype="bfloat16", compile=True)
    seeds = torch.arange(prompts.shape[0])
    res = sample(model, prompts, cfg, None, eos, pad, model.config.canvas_length, row_seeds=seeds)
    nfe = float(res.nfe.mean())
    total = ms_per_call(lambda: sample(model, prompts, cfg, None, eos, pad, model.config.canvas_length,
                                      row_seeds=seeds), reps)
    parts = nfe * t_forward + t_encode
    print(f"[step loop] sample() at {steps} steps: {total:.1f} ms for {nfe:.2f} forward passes per row; "
          f"{nfe:.2f} x {t_forward:.1f} ms decoder + {t_encode:.1f} ms encoder = {parts:.1f} ms, so the loop's "
          f"own work is {(total - parts) / nfe:+.1f} ms per step")


def main(argv=None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--sample-steps", type=int, default=12,
                    help="also time one whole fast-sampler call of this many steps against its parts (0: skip)")
    ap.add_argument("--table", action="store_true", help="print the profiler table of the compiled bf16 forward")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench_sampler import load, prompts_and_rows

    model, tok, desc = load(None)
    _, prompts, _ = prompts_and_rows(tok, args.batch)
    g = torch.Generator().manual_seed(0)
    b, p = prompts.shape
    l, v = model.config.canvas_length, model.config.text_config.vocab_size
    canvas = torch.randint(0, v, (b, l), generator=g)  # [b, l]
    sc = 3 * torch.randn(b, l, v, generator=g)  # [b, l, v]
    positions = torch.arange(p, p + l)[None]
    print(f"[profile] {desc}; batch {b}, prompt {p}, canvas {l}, threads {torch.get_num_threads()}")
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        ref = ms_per_call(lambda: decode(model, canvas, cache, sc, decoder_attention_mask=NO_MASKS,
                                         decoder_position_ids=positions), args.reps)
        print(f"{'transformers decoder':>28} {ref:8.1f} ms  1.00x")
        for name, dtype, compiled in (("fused fp32", torch.float32, False), ("fused bf16", torch.bfloat16, False),
                                      ("fused bf16 compiled", torch.bfloat16, True)):
            dec = FusedDecoder(model, dtype)
            if compiled:
                dec.compile()
            kv, rope = dec.prepare_cache(cache), dec.rope_tables(positions)
            t = ms_per_call(lambda: dec(canvas, kv, rope, sc), args.reps)
            print(f"{name:>28} {t:8.1f} ms  {ref / t:.2f}x")
        enc_ref = ms_per_call(lambda: encode(model, prompts), args.reps)
        print(f"{'transformers encoder':>28} {enc_ref:8.1f} ms  1.00x   (the prompt, once per sample() call)")
        t_enc = ms_per_call(lambda: dec.encode_prompt(prompts), args.reps)
        print(f"{'fused encoder bf16 compiled':>28} {t_enc:8.1f} ms  {enc_ref / t_enc:.2f}x")
        print_roofline(dec, b, p, l, v, args.reps)
        if args.sample_steps:
            print_step_overhead(model, prompts, tok.eos_token_id, tok.pad_token_id, args.sample_steps, t, t_enc,
                                max(args.reps // 2, 2))
        if args.table:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(args.reps):
                    dec(canvas, kv, rope, sc)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
