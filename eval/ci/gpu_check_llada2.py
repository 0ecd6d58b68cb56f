"""GPU check of the block-diffusion family on the real weights, for a machine with a GPU (LLaDA2.0-mini is 16B
parameters: ~32 GiB in bf16) and a local copy of inclusionAI/LLaDA2.0-mini (the lent machines reach no hub: copy the
folder there first). Not a test.

    python eval/ci/gpu_check_llada2.py /path/to/LLaDA2.0-mini [--steps 32] [--gen 64] [--block 32]

What only the real checkpoint can show (tests/test_llada2.py shows the rest on the tiny LLaDA2):
1. the profile recognises its config (architecture LLaDA2MoeModelLM) and loading without `trust_remote_code` is
   refused with dgtune's one-line error, and with it the folder loads through dgtune's own loader
   (`gpu_check_common.refuse_then_load`: the profile's class, the family's [MASK]);
2. the LoRA pattern adapts the attention of every layer, the dense first layer's MLP and every shared expert, and
   no router, routed expert, embedding or `lm_head`;
3. dgtune's family calls (`window_hidden` -> `lm_logits`) give the checkpoint's own logits under the 4-D
   block-causal mask its `generate()` builds (bf16, max abs difference printed, < 0.05 asserted);
4. dgtune's loss with `objective=llada2` equals the dFactory transcription on identical draws (bf16, rel 1e-2);
5. dgtune's block sampler (`sampler=block_refine`, threshold 0.95, greedy) draws the tokens of the checkpoint's own
   `generate(temperature=0, block_length, steps, threshold=0.95)` (agreement printed, >= 0.95 asserted; bf16 ties
   may differ). Also printed: whether the checkpoint's forward with a 2-D mask (what diffusers' `LLaDA2Pipeline`
   passes) gives the block-causal logits; the remote code as read (dllm's copy) turns a 2-D mask into a causal mask
   or none.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval" / "ci"))


def main() -> None:
    """Run the five checks on the checkpoint folder given."""
    from dgtune.config import compose
    from dgtune.diffusion.loss import denoising_loss
    from dgtune.diffusion.model_calls import lm_logits
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.models.families.llada2 import window_hidden
    from dgtune.models.family import family_of
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample
    from dgtune.train import apply_lora
    from llada2_reference import block_causal_4d, llada2_bd_loss
    from gpu_check_common import refuse_then_load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--block", type=int, default=32)
    args = p.parse_args()
    model, tok = refuse_then_load(args.path, "llada2")
    assert family_of(model).name == "llada2"
    model.config.block_size = args.block
    mask_id, eos_id = 156895, 156892

    lora = apply_lora(model, compose(["model=diffusiongemma_26b", "lora.r=4"]).lora)
    adapted = {n for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    n_layers, dense = model.config.num_hidden_layers, model.config.first_k_dense_replace
    assert len(adapted) == 2 * n_layers + 3 * n_layers, len(adapted)  # attention x2, dense MLP or shared expert x3
    assert not any(re.search(r"lm_head$|word_embeddings$|mlp\.gate$|\.experts\.\d+\.", n) for n in adapted)
    print(f"[llada2] 2 LoRA on {len(adapted)} modules ({dense} dense layers); router, experts, head untouched")
    lora.unload()

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].cuda()
    p_len = ids.shape[1]
    width = -(-(p_len + args.gen) // args.block) * args.block
    x = torch.randint(100, 5000, (1, width), device="cuda")
    x[:, :p_len] = ids
    keys = torch.ones_like(x)
    with torch.no_grad():
        ours = lm_logits(model, window_hidden(model, x, keys)).float()
        pos = torch.arange(width, device="cuda")[None]
        mask = block_causal_4d(keys, args.block)
        additive = torch.zeros(mask.shape, dtype=torch.bfloat16, device="cuda").masked_fill(~mask, float("-inf"))
        ref = model(x, attention_mask=additive, position_ids=pos).logits.float()
        two_d = model(x, attention_mask=keys, position_ids=pos).logits.float()
    diff = float((ours - ref).abs().max())
    print(f"[llada2] 3 family calls vs model() under generate()'s mask: max |logit diff| {diff:.4f}; "
          f"with a 2-D mask (diffusers' pipeline): {float((two_d - ref).abs().max()):.4f}")
    assert diff < 0.05

    answer = torch.randint(100, 5000, (args.gen,), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": torch.tensor([p_len],
             device="cuda"), "canvas": answer[None]}
    ocfg = ObjectiveConfig(**{k: v for k, v in compose(["objective=llada2"]).objective.items()})
    with torch.no_grad():
        out = denoising_loss(model, batch, ocfg, torch.Generator("cuda").manual_seed(5), model.config.vocab_size,
                             mask_id)["loss"]
        g = torch.Generator("cuda").manual_seed(5)
        t, u = torch.rand(1, generator=g, device="cuda"), torch.rand(1, args.gen, generator=g, device="cuda")
        ref_loss = llada2_bd_loss(model, [ids[0].cpu()], [answer.cpu()], t.cpu(), u.cpu(), mask_id, args.block)
    print(f"[llada2] 4 loss {float(out):.5f} vs dFactory {float(ref_loss):.5f}")
    torch.testing.assert_close(out.float().cpu(), ref_loss.float().cpu(), rtol=1e-2, atol=1e-3)

    scfg = SamplerConfig(strategy="threshold", noise="mask", commit="argmax", threshold=0.95, max_steps=args.steps,
                         mask_token_id=mask_id, block_length=args.block)
    with torch.no_grad():
        mine = sample(model, ids, scfg, torch.Generator("cuda").manual_seed(0), eos_id, tok.pad_token_id, args.gen)
        theirs = model.generate(inputs=ids, temperature=0.0, block_length=args.block, steps=args.steps,
                                gen_length=args.gen, threshold=0.95, eos_early_stop=True, eos_id=eos_id,
                                mask_id=mask_id)
    theirs = theirs[:, -args.gen:] if theirs.shape[1] >= args.gen else theirs
    n = min(mine.tokens.shape[1], theirs.shape[1])
    agree = float((mine.tokens[:, :n] == theirs[:, :n].to(mine.tokens.device)).float().mean())
    print(f"[llada2] 5 block sampler vs the checkpoint's generate(): {agree:.3f} of {n} tokens agree")
    print("   ours:  ", tok.decode(mine.tokens[0], skip_special_tokens=True)[:200])
    print("   theirs:", tok.decode(theirs[0], skip_special_tokens=True)[:200])
    assert agree >= 0.95
    print("[llada2] all done")


if __name__ == "__main__":
    main()
