"""Memory plan: dgtune.memory's prediction checked against measured CPU steps, then the plan for the real 26B.

    OMP_NUM_THREADS=1 python eval/bench/memory_plan.py [--skip-measure]

1. Measured: the bench_train step (`denoising_loss` + backward + AdamW, LoRA default targets, released objective
   with self-conditioning on every example) on a 26B-shaped model (MEASURED_SIZES, vocab 262,144) in fp32 on CPU,
   each setting in its own subprocess through `eval/bench/bench_train.py`'s `run_row` (peak RSS minus RSS after load).
   Activations are as derived (act_scale=1); the one constant, a fixed runtime overhead (allocator, autograd/BLAS
   workspaces), is fitted on the FIRST setting only; the others are the check.
2. Plan: the real 26B (`REAL_26B`, from dgtune/models/shaped.py's table) on 1x H100 80 GB and 1x 24 GB (4-bit),
   LoRA r16, bf16, prompt 512, canvas 256; then 8x H100 under FSDP2 (LoRA, LoRA + experts, full fine-tune; the
   main process with its replica and the others), checked on 2 CPU processes by eval/bench/memory_fsdp2.py.
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from dgtune.memory import (  # noqa: E402
    MIB, TextShape, TrainSettings, four_bit_weight_bytes, linear_parameters, parameter_counts, predict_memory,
    quantised_parameters,
)

MEASURED_SIZES = dict(hidden_size=256, head_dim=32, global_head_dim=64, intermediate_size=192,
                      moe_intermediate_size=64)
REAL_26B = TextShape(vocab_size=262_144, hidden_size=2816, layer_types=(["sliding_attention"] * 5
                     + ["full_attention"]) * 5, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                     num_global_key_value_heads=2, global_head_dim=512, intermediate_size=2112, num_experts=128,
                     top_k_experts=8, moe_intermediate_size=704)
# (name, batch, prompt, canvas, loss_chunk, checkpointing); the first row fits the overhead
SETTINGS = [("chunk32 b4", 4, 48, 32, 32, False), ("plain b2", 2, 48, 32, 0, False),
            ("chunk32+ckpt b4", 4, 48, 32, 32, True), ("chunk32 b8", 8, 48, 32, 32, False),
            ("chunk128 b2 p96", 2, 96, 32, 128, False)]
GIB = 2**30


def build_measured_model():
    """The measured 26B-shaped model (builder for bench_train's worker: `memory_plan:build_measured_model`)."""
    from dgtune.models.shaped import build_shaped_model

    return build_shaped_model(**MEASURED_SIZES)


def measured_shape() -> TextShape:
    """TextShape of `build_measured_model` (from its config; no model built)."""
    from dgtune.models.shaped import build_shaped_config

    return TextShape.from_config(build_shaped_config(**MEASURED_SIZES).text_config)


def step_part(pred: dict) -> float:
    """What bench_train's 'step MiB' covers: everything above the loaded model + LoRA params (bytes)."""
    return pred["activations"] + pred["logits"] + pred["lora_states"] + pred["overhead"]


def fit_overhead() -> float:
    """The fixed CPU runtime overhead (bytes), fitted on the first of SETTINGS as `measure` fits it."""
    import bench_train

    name, b, p, l, chunk, ckpt = SETTINGS[0]
    args = Namespace(builder="memory_plan:build_measured_model", batch=b, prompt=p, canvas=l, steps=1, threads=1,
                     device="cpu", objective="released", bf16=False)
    got = bench_train.run_row(args, chunk, ckpt)["step_mib"] * MIB
    st = TrainSettings(batch=b, prompt=p, canvas=l, loss_chunk=chunk, gradient_checkpointing=ckpt, weight_bytes=4,
                       act_bytes=4)
    return got - step_part(predict_memory(measured_shape(), st))


def measure() -> float:
    """Run SETTINGS through bench_train's subprocess worker; print the comparison table; return the overhead."""
    import bench_train

    shape = measured_shape()
    rows, overhead = [], None
    for name, b, p, l, chunk, ckpt in SETTINGS:
        args = Namespace(builder="memory_plan:build_measured_model", batch=b, prompt=p, canvas=l, steps=1, threads=1,
                         device="cpu", objective="released", bf16=False)
        got = bench_train.run_row(args, chunk, ckpt)["step_mib"] * MIB
        st = TrainSettings(batch=b, prompt=p, canvas=l, loss_chunk=chunk, gradient_checkpointing=ckpt,
                           weight_bytes=4, act_bytes=4)
        if overhead is None:  # the one fitted constant
            overhead = got - step_part(predict_memory(shape, st))
        rows.append((name, step_part(predict_memory(shape, st, overhead=overhead)), got))
    print(f"[measured] 26B-shaped {MEASURED_SIZES}, vocab 262144, fp32 CPU, LoRA r16 default targets, "
          f"released objective (self_cond_p=1); act_scale=1; overhead={overhead / MIB:.0f} MiB fitted on '{SETTINGS[0][0]}' only")
    print(f"{'setting':22s} | {'predicted MiB':>13s} | {'measured MiB':>12s} | {'error %':>7s}")
    for i, (name, pred, got) in enumerate(rows):
        tag = " (calibration)" if i == 0 else ""
        print(f"{name:22s} | {pred / MIB:13.0f} | {got / MIB:12.0f} | {100 * (pred - got) / got:+7.1f}{tag}")
    return overhead


def plan() -> None:
    """Print the plan table for the real 26B (bf16 autocast activations as derived; the CUDA context is the 1 GiB
    taken off each card, not the CPU overhead)."""
    counts = parameter_counts(REAL_26B)
    n = sum(counts.values())
    lin = linear_parameters(REAL_26B)
    print(f"\n[26B] text parameters {n / 1e9:.2f} B (experts {counts['experts'] / 1e9:.2f} B = "
          f"{100 * counts['experts'] / n:.0f}%, embedding/LM head {counts['embedding'] / 1e9:.2f} B, nn.Linear "
          f"{lin / 1e9:.2f} B = {100 * lin / n:.0f}%); bf16 weights {n * 2 / GIB:.1f} GiB")
    q_all, q_default = four_bit_weight_bytes(REAL_26B, True), four_bit_weight_bytes(REAL_26B, False)
    print(f"[26B] 4-bit (NF4 on nn.Linear only): {q_all / GIB:.1f} GiB as model.quantization=4bit loads it (layer "
          f"linears quantised, {quantised_parameters(REAL_26B) / 1e9:.2f} B params; router and LM head skipped); "
          f"{q_default / GIB:.1f} GiB with transformers' default skip list (every tied key skipped)")
    cards = [("1x H100 80GB bf16", 80, 1, None, False), ("1x H100 + expert LoRA", 80, 1, None, True),
             ("1x 24GB 4-bit", 24, 1, q_all, False)]
    print(f"{'setup':22s} {'batch':>5s} {'ckpt':>4s} | {'weights':>8s} {'acts':>7s} {'logits':>7s} "
          f"{'lora+opt':>8s} | {'total GiB':>9s} | verdict (usable = 0.92 x card - 1 GiB context)")
    for name, card, gpus, wb, experts in cards:
        for ckpt in (False, True):
            for b in (1, 2, 4, 8):
                st = TrainSettings(batch=b, prompt=512, canvas=256, loss_chunk=128, gradient_checkpointing=ckpt,
                                   gpus=gpus, lora_experts=experts)
                pr = predict_memory(REAL_26B, st, weight_bytes_total=wb)
                usable = 0.92 * card * 1e9 / GIB - 1
                verdict = "FITS" if pr["total"] / GIB <= usable else "DOES NOT FIT"
                print(f"{name:22s} {b:5d} {'on' if ckpt else 'off':>4s} | {pr['weights'] / GIB:8.1f} "
                      f"{pr['activations'] / GIB:7.1f} {pr['logits'] / GIB:7.2f} "
                      f"{(pr['lora_params'] + pr['lora_states']) / GIB:8.2f} | {pr['total'] / GIB:9.1f} | {verdict}")


def plan_fsdp2() -> None:
    """Print the 8x H100 FSDP2 rows (`trainer.strategy=fsdp2`, dgtune/sharded.py): a training step (any process:
    shards, a gathered layer and the gathered embedding; LoRA runs hold the tied layer weights twice, sharded; a full
    fine-tune shards fp32 grads and AdamW states of every parameter, self_cond_p=0 there) and the main process
    during an eval (the unsharded bf16 replica moved onto its device beside its shards and optimizer states)."""
    print("\n[26B] 8x H100 FSDP2, prompt 512, canvas 256, loss_chunk 128, bf16 weights, checkpointing on")
    print(f"{'setting':24s} {'phase':>11s} {'batch':>5s} | {'weights':>8s} {'acts':>7s} {'logits':>7s} "
          f"{'train st':>8s} | {'total GiB':>9s} | verdict")
    usable = 0.92 * 80 * 1e9 / GIB - 1
    for name, experts, full in (("LoRA r16", False, False), ("LoRA r16 + experts", True, False),
                                ("full fine-tune", False, True)):
        for phase, batches in (("train step", (1, 2, 4, 8)), ("main eval", (1,))):
            for b in batches:
                st = TrainSettings(batch=b, prompt=512, canvas=256, loss_chunk=128, gradient_checkpointing=True,
                                   gpus=8, lora_experts=experts, full_finetune=full, fsdp2_eval=phase == "main eval",
                                   fsdp2_untied=not full)
                pr = predict_memory(REAL_26B, st)
                verdict = "FITS" if pr["total"] / GIB <= usable else "DOES NOT FIT"
                print(f"{name:24s} {phase:>11s} {b if phase == 'train step' else '-':>5} | "
                      f"{pr['weights'] / GIB:8.1f} {pr['activations'] / GIB:7.1f} {pr['logits'] / GIB:7.2f} "
                      f"{(pr['lora_params'] + pr['lora_states']) / GIB:8.2f} | {pr['total'] / GIB:9.1f} | {verdict}")


def plan_recipe(name: str = "sudoku_26b") -> None:
    """The 26B rows at a recipe's own sizes: its batch, chunk and checkpointing, the longest prompt of its first 200
    training rows with the bundled tokenizer (one token per digit; the 26B's chat template adds a few more) and its
    canvas, on 1 GPU and 8 (FSDP2)."""
    from dgtune.config import compose
    from dgtune.data import prompt_ids, row_prompt, splits_for
    from dgtune.models.load import load_model
    from dgtune.tasks import build_task

    cfg = compose([f"recipe={name}", "model=tiny"])  # the tiny model's tokenizer; no 26B download
    task = build_task(cfg.task)
    _, tok = load_model(cfg.model)
    prompt = max(len(prompt_ids(tok, row_prompt(r))) for r in splits_for(task, cfg)["train"][:200])
    tc = cfg.trainer
    print(f"\n[26B] recipe={name}: batch {tc.batch_size}, prompt {prompt}, canvas {task.canvas_length}, "
          f"loss_chunk {cfg.objective.loss_chunk}, checkpointing {'on' if tc.gradient_checkpointing else 'off'}")
    usable = 0.92 * 80 * 1e9 / GIB - 1
    for gpus in (1, 8):
        st = TrainSettings(batch=tc.batch_size, prompt=prompt, canvas=task.canvas_length,
                           loss_chunk=cfg.objective.loss_chunk, gradient_checkpointing=tc.gradient_checkpointing,
                           gpus=gpus, fsdp2_untied=gpus > 1)
        pr = predict_memory(REAL_26B, st)
        print(f"  {gpus}x H100{' FSDP2' if gpus > 1 else ''}: {pr['total'] / GIB:.1f} GiB "
              f"(activations {pr['activations'] / GIB:.1f}) | {'FITS' if pr['total'] / GIB <= usable else 'DOES NOT FIT'}")


def main() -> None:
    """Measure and check (unless --skip-measure), then print the 26B plan."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-measure", action="store_true")
    args = p.parse_args()
    if not args.skip_measure:
        measure()
    plan()
    plan_fsdp2()
    plan_recipe()


if __name__ == "__main__":
    main()
