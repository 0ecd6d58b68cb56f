"""GPU check of SDAR on the real weights, for a machine with a GPU (SDAR-4B-Chat: ~8 GiB in bf16; its modeling file
imports flash-attn, so install it there) and a local copy of JetAstra/SDAR-4B-Chat (the lent machines reach no hub:
copy the folder there first). Not a test.

    python eval/ci/gpu_check_sdar.py /path/to/SDAR-4B-Chat [--steps 4] [--gen 64]

What only the real checkpoint can show (tests/test_sdar.py shows the rest on the tiny SDAR):
1. the profile recognises its config (architecture SDARForCausalLM) and loading without `trust_remote_code` is
   refused with dgtune's one-line error, and with it the folder loads through dgtune's own loader
   (`gpu_check_common.refuse_then_load`);
2. the LoRA pattern adapts q/k/v/o and gate/up/down of every layer, and no norm, embedding or `lm_head`;
3. eval mode: dgtune's family calls (`window_hidden` -> `lm_logits`, a bool mask) give the checkpoint's own logits
   under the 1/0 block-causal mask its `generate.py` passes (bf16, max abs difference printed, < 0.05 asserted);
4. training mode: dgtune's `objective=sdar` loss (a flex-attention BlockMask, SDAR's own training attention) equals
   the transcription of SDAR's training step on identical draws (bf16, rel 1e-2), and its backward reaches the LoRA
   weights through flex attention;
5. dgtune's `sampler=sdar_block` draws the tokens of the transcription of `generate.py` (same seed, agreement
   printed, >= 0.9 asserted: bf16 rounding can flip a draw, after which the rest differs).
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
    from gpu_check_common import refuse_then_load
    from sdar_reference import sdar_generate, sdar_loss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--gen", type=int, default=64)
    args = p.parse_args()
    model, tok = refuse_then_load(args.path, "sdar")
    assert family_of(model).name == "sdar"
    block, mask_id = int(model.config.block_size), int(model.config.mask_token_id)

    lora = apply_lora(model, compose(["model=diffusiongemma_26b", "lora.r=4"]).lora)
    adapted = {n for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == 7 * model.config.num_hidden_layers, len(adapted)
    assert not any(re.search(r"lm_head$|embed_tokens$|norm$", n) for n in adapted)
    print(f"[sdar] 2 LoRA on {len(adapted)} modules; norms, embedding, head untouched")

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].cuda()
    p_len = ids.shape[1]
    width = -(-(p_len + args.gen) // block) * block
    x = torch.randint(100, 5000, (1, width), device="cuda")
    x[:, :p_len] = ids
    with torch.no_grad():
        ours = lm_logits(lora, window_hidden(lora, x, torch.ones_like(x))).float()
        n_blocks = width // block
        mask = torch.tril(torch.ones(n_blocks, n_blocks, device="cuda"))
        mask = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[None]  # generate.py's form
        ref = lora(x, attention_mask=mask, position_ids=torch.arange(width, device="cuda")[None]).logits.float()
    diff = float((ours - ref).abs().max())
    print(f"[sdar] 3 family calls vs model() under generate.py's mask: max |logit diff| {diff:.4f}")
    assert diff < 0.05

    answer = torch.randint(100, 5000, (args.gen,), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": torch.tensor([p_len], device="cuda"),
             "canvas": answer[None]}
    ocfg = ObjectiveConfig(**{k: v for k, v in compose(["objective=sdar"]).objective.items()})
    lora.train()
    out = denoising_loss(lora, batch, ocfg, torch.Generator("cuda").manual_seed(5), model.config.vocab_size, mask_id)
    out["loss"].backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n and p.grad is not None]
    g = torch.Generator("cuda").manual_seed(5)
    tries = [(torch.rand(1, generator=g, device="cuda"), torch.rand(1, args.gen, generator=g, device="cuda"))
             for _ in range(10)]
    with torch.no_grad():
        ref_loss = sdar_loss(lora.get_base_model(), [ids[0]], [answer], torch.stack([t for t, _ in tries]),
                             torch.stack([u for _, u in tries]), mask_id, tok.pad_token_id, block)
    lora.eval()
    print(f"[sdar] 4 loss {float(out['loss']):.5f} vs SDAR's step {float(ref_loss):.5f}; "
          f"{sum(int(g.abs().sum() > 0) for g in grads)} of {len(grads)} LoRA B matrices got a gradient")
    torch.testing.assert_close(out["loss"].detach().float().cpu(), ref_loss.float().cpu(), rtol=1e-2, atol=1e-3)
    assert grads and all(g.abs().sum() > 0 for g in grads)
    lora.unload()

    scfg = SamplerConfig(**{k: v for k, v in compose(["sampler=sdar_block"]).sampler.items() if k != "name"})
    scfg = SamplerConfig(**{**scfg.__dict__, "max_steps": args.steps, "block_length": block, "mask_token_id": mask_id})
    gen = width - p_len  # whole blocks: generate.py decodes the last block whole
    with torch.no_grad():
        mine = sample(model, ids, scfg, torch.Generator("cuda").manual_seed(0), tok.eos_token_id, tok.pad_token_id,
                      gen).tokens[0]
        theirs = sdar_generate(model, ids, mask_id, gen, block, args.steps, scfg.threshold, [tok.eos_token_id],
                               torch.Generator("cuda").manual_seed(0))[0, p_len:]
    n = int((theirs == tok.eos_token_id).nonzero()[0]) + 1 if (theirs == tok.eos_token_id).any() else gen
    agree = float((mine[:n] == theirs[:n]).float().mean())
    print(f"[sdar] 5 sampler vs generate.py: {agree:.3f} of {n} tokens agree")
    print("   ours:  ", tok.decode(mine[:n], skip_special_tokens=True)[:200])
    print("   theirs:", tok.decode(theirs[:n], skip_special_tokens=True)[:200])
    assert agree >= 0.9
    print("[sdar] all done")


if __name__ == "__main__":
    main()
