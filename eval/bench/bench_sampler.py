"""Benchmark: dgtune's fast sampler against transformers' `DiffusionGemmaForBlockDiffusion.generate()` (not a test).

    python eval/bench/bench_sampler.py [--run RUN_DIR] [--size 9|4] [--quick] [--reps 3] [--n-single 8] [--threads 1]
                                 [--sampler NAME] [--decoder auto|fused|transformers] [--dtype fast|auto|float32|bfloat16]
                                 [--compile | --no-compile]

Loads the bundled tiny DiffusionGemma (or a fresh random one when the bundled weights are missing), optionally a
run's LoRA adapter (`--run`), builds 9x9 Sudoku prompts (test split, medium bucket) and, for batch 64 and batch 1
at max_steps 12 and 48, times `model.generate()` and `dgtune.sampling.sample(mode="fast")` on the same prompts in
this process (median over repetitions, the two interleaved; `--sampler NAME` uses configs/sampler/NAME.yaml for
dgtune, default entropy_bound, the algorithm generate() runs; `--decoder/--dtype/--compile` set its decoder:
by default the fused decoder with bf16 matmuls where the hardware has fast bf16, torch.compile'd, i.e.
`python -m dgtune.eval RUN_DIR sampler.decoder_dtype=fast sampler.compile=true`; `--dtype auto --no-compile` is
the sampler's config default, fp32 on the tiny model). Both samplers are warmed up (batch 64, 1 and 2: a
`--compile` run has then compiled its static and dynamic-batch graphs) before anything is timed. Prints tokens/s
(generated tokens up to and including EOS), the ratio, decoder forward passes per sequence, the solved rate and blank-cell accuracy, and as its last line
`speedup_b64=X.XX speedup_b1=Y.YY solved_delta=Z.ZZZ` (speedups: dgtune tokens/s / transformers tokens/s,
geometric mean over the step counts; solved_delta: dgtune minus transformers solved fraction at batch 64, pooled
over step counts).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dgtune.data import prompt_ids  # noqa: E402
from dgtune.sampling.sampler import SamplerConfig, sample  # noqa: E402
from dgtune.tasks.sudoku import SudokuTask  # noqa: E402

CANVAS = 88  # 9x9 (81 digits + EOS, as the 9x9 recipes); 24 with --size 4 (configs/task/sudoku4.yaml)


def load(run: str | None):
    """(model, tokenizer, description): a run (base + adapter), the bundled tiny base, or a random tiny model."""
    from dgtune.config import compose
    from dgtune.models.load import ModelNotAvailableError, load_model

    if run:
        from omegaconf import OmegaConf

        from dgtune.eval.runs import load_run

        model, tok, _ = load_run(Path(run), OmegaConf.load(Path(run) / "config.yaml"))
        desc = f"run {run}"
    else:
        try:
            model, tok = load_model(compose(["recipe=sudoku"]).model)
            desc = "bundled tiny DiffusionGemma"
        except ModelNotAvailableError:
            from dgtune.models.tiny import build_tiny_model

            model, tok = build_tiny_model()
            desc = "RANDOM tiny DiffusionGemma (dgtune/assets/tiny-diffusiongemma/model.safetensors is missing)"
    model.config.canvas_length = CANVAS
    model.eval()
    return model, tok, desc


def prompts_and_rows(tok, n: int, size: int = 9):
    """n test puzzles (9x9: medium bucket; 4x4: 4-12 givens) with equal-length prompts: (prompt ids [n, p], rows)."""
    task = SudokuTask(9, (30, 45), {"medium": [30, 39]}) if size == 9 else SudokuTask(4, (4, 12), {"all": [4, 12]})
    rows = task.build_split("test", n, 0)
    ids = [prompt_ids(tok, r["prompt"]) for r in rows]
    assert len({len(x) for x in ids}) == 1, "prompts of different lengths"
    return task, torch.tensor(ids), rows


def run_hf(model, prompts, steps, eos, pad, seed):
    """transformers generate(): (new tokens [b, l], nfe [b])."""
    torch.manual_seed(seed)
    out = model.generate(prompts, max_new_tokens=CANVAS, max_denoising_steps=steps, eos_token_id=eos,
                         pad_token_id=pad)
    tokens = out.sequences[:, prompts.shape[1]:]
    n_tok = (tokens != pad).sum(-1).float()
    return tokens, n_tok / out.tokens_per_forward.float()


SAMPLER = {}  # settings from configs/sampler/<--sampler>.yaml


def run_fast(model, prompts, steps, eos, pad, row_seeds):
    """dgtune fast sampler: (tokens [b, l], nfe [b])."""
    cfg = SamplerConfig(**{**SAMPLER, "mode": "fast", "max_steps": steps})
    res = sample(model, prompts, cfg, None, eos, pad, CANVAS, row_seeds=row_seeds)
    return res.tokens, res.nfe


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench(model, tok, task, prompts, rows, batch, steps_list, reps, n_single):
    """{(batch, steps, sampler): stats} for batch 64 (one call) or batch 1 (n_single calls)."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    n = prompts.shape[0] if batch > 1 else n_single
    seeds = torch.arange(n) * 7 + 1
    results = {}
    for steps in steps_list:
        acc = {"transformers": [], "dgtune": []}
        for rep in range(reps):
            for name in ("transformers", "dgtune"):
                secs, toks, nfes = 0.0, [], []
                for start in range(0, n, batch):
                    p = prompts[start:start + batch]
                    if name == "transformers":
                        s, (t, f) = timed(run_hf, model, p, steps, eos, pad, 1000 * rep + start)
                    else:
                        rs = seeds[start:start + batch] + 10_000 * rep
                        s, (t, f) = timed(run_fast, model, p, steps, eos, pad, rs)
                    secs, toks, nfes = secs + s, toks + [t], nfes + [f]
                toks, nfes = torch.cat(toks), torch.cat(nfes)
                texts = tok.batch_decode(toks, skip_special_tokens=True)
                grades = [task.grade(rows[i], texts[i]) for i in range(n)]
                acc[name].append({"seconds": secs, "tokens": int((toks != pad).sum()), "nfe": nfes.mean().item(),
                                  "solved": [g["solved"] for g in grades],
                                  "cell": [g["cell_acc"] for g in grades], "out": toks})
        for name, runs in acc.items():
            results[(batch, steps, name)] = {
                "tok_s": statistics.median(r["tokens"] / r["seconds"] for r in runs),
                "nfe": statistics.mean(r["nfe"] for r in runs),
                "tok_seq": statistics.mean(r["tokens"] for r in runs) / n,
                "solved": [s for r in runs for s in r["solved"]],
                "cell": [c for r in runs for c in r["cell"]],
                "out": runs[0]["out"],
            }
    return results


def main(argv=None) -> str:
    """CLI entry point; returns the last line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a dgtune run folder (LoRA adapter or full model in RUN_DIR/final)")
    ap.add_argument("--quick", action="store_true", help="tiny run: batch 16, steps 4 and 8, 1 repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-single", type=int, default=8, help="prompts sampled one at a time for batch 1")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine more threads oversubscribe the "
                         "cores and make every timing 10-20x slower; 0 = torch's default)")
    ap.add_argument("--sampler", default="entropy_bound", help="dgtune strategy: a configs/sampler/NAME.yaml")
    ap.add_argument("--size", type=int, default=9, choices=(9, 4), help="Sudoku size of the prompts (4: use --run "
                    "with a 4x4 adapter, a model that solves puzzles, to check accuracy)")
    ap.add_argument("--decoder", help="override sampler.decoder (auto | fused | transformers)")
    ap.add_argument("--dtype", default="fast",
                    help="sampler.decoder_dtype (auto | fast | float32 | bfloat16; default fast: bf16 matmuls where "
                         "the hardware has fast bf16, else the model dtype)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="sampler.compile (torch.compile the fused decoder; default on, --no-compile for eager)")
    args = ap.parse_args(argv)
    from dgtune.eval.runs import load_group

    SAMPLER.clear()
    SAMPLER.update({k: v for k, v in load_group("sampler", args.sampler).items() if k != "name"})
    for key, val in (("decoder", args.decoder), ("decoder_dtype", args.dtype)):
        if val:
            SAMPLER[key] = val
    SAMPLER["compile"] = args.compile
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    batch, steps_list, reps, n_single = (16, (4, 8), 1, 2) if args.quick else (64, (12, 48), args.reps, args.n_single)
    global CANVAS
    CANVAS = 88 if args.size == 9 else 24
    model, tok, desc = load(args.run)
    if SAMPLER.get("noise") == "mask" and SAMPLER.get("mask_token_id") is None:
        SAMPLER["mask_token_id"] = tok.mask_token_id
    task, prompts, rows = prompts_and_rows(tok, batch, args.size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prompts = prompts.to(device)
    print(f"[bench] model: {desc}; device {device}, threads {torch.get_num_threads()}; prompts {tuple(prompts.shape)}, "
          f"canvas {CANVAS}; reps {reps}; dgtune sampler {args.sampler} "
          f"(decoder {SAMPLER.get('decoder', 'auto')}, dtype {SAMPLER.get('decoder_dtype', 'auto')}, "
          f"compile {SAMPLER.get('compile', False)})")
    t_warm = time.perf_counter()
    # warm-up; with --compile also compiles the batch-64, batch-1 and (from a third size on) dynamic-batch graphs,
    # so that rows retiring mid-run (other batch sizes) do not compile inside a timed run
    for p in (prompts, prompts[:1], prompts[:2]):
        run_fast(model, p, 2, tok.eos_token_id, tok.pad_token_id, torch.arange(p.shape[0]))
        run_hf(model, p, 2, tok.eos_token_id, tok.pad_token_id, 0)
    print(f"[bench] warm-up {time.perf_counter() - t_warm:.1f} s")
    res = {**bench(model, tok, task, prompts, rows, batch, steps_list, reps, n_single),
           **bench(model, tok, task, prompts, rows, 1, steps_list, reps, n_single)}
    print(f"{'batch':>5} {'steps':>5} {'sampler':>12} {'tok/s':>9} {'ratio':>6} {'nfe/seq':>8} {'tok/seq':>8} "
          f"{'solved':>7} {'blank-cell':>10}")
    speed = {batch: [], 1: []}
    for b in (batch, 1):
        for s in steps_list:
            hf, fa = res[(b, s, "transformers")], res[(b, s, "dgtune")]
            ratio = fa["tok_s"] / hf["tok_s"]
            speed[b].append(ratio)
            for name, r in (("transformers", hf), ("dgtune", fa)):
                solved, cell = sum(r["solved"]) / len(r["solved"]), sum(r["cell"]) / len(r["cell"])
                rt = f"{ratio:6.2f}" if name == "dgtune" else f"{'':6}"
                print(f"{b:>5} {s:>5} {name:>12} {r['tok_s']:9.1f} {rt} {r['nfe']:8.2f} {r['tok_seq']:8.1f} "
                      f"{solved:7.3f} {cell:10.3f}")
    inv = all(torch.equal(res[(1, s, "dgtune")]["out"], res[(batch, s, "dgtune")]["out"][:n_single])
              for s in steps_list)
    print(f"[bench] dgtune batch-1 tokens == batch-{batch} tokens for the same row seeds: {inv}")
    pooled = {name: [x for s in steps_list for x in res[(batch, s, name)]["solved"]]
              for name in ("transformers", "dgtune")}
    delta = sum(pooled["dgtune"]) / len(pooled["dgtune"]) - sum(pooled["transformers"]) / len(pooled["transformers"])
    cells = {name: [x for s in steps_list for x in res[(batch, s, name)]["cell"]] for name in pooled}
    cell_delta = sum(cells["dgtune"]) / len(cells["dgtune"]) - sum(cells["transformers"]) / len(cells["transformers"])
    print(f"[bench] blank-cell accuracy delta (dgtune - transformers, batch {batch}, pooled): {cell_delta:+.3f}")
    geo = {b: math.exp(sum(math.log(x) for x in v) / len(v)) for b, v in speed.items()}
    line = f"speedup_b64={geo[batch]:.2f} speedup_b1={geo[1]:.2f} solved_delta={delta:.3f}"
    print(f"[bench] {time.perf_counter() - t_start:.0f} s")
    print(line)
    return line


if __name__ == "__main__":
    main()
