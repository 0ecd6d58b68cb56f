"""GPU check of the LLaDA and LLaDA-MoE families on the real weights, for a machine with a GPU and a local copy of
GSAI-ML/LLaDA-8B-Instruct or inclusionAI/LLaDA-MoE-7B-A1B-Instruct (the lent machines reach no hub: copy the folder
there first). Not a test.

    python eval/ci/gpu_check_llada.py /path/to/LLaDA-8B-Instruct [--steps 8] [--gen 32]
    python eval/ci/gpu_check_llada.py /path/to/LLaDA-MoE-7B-A1B-Instruct

LLaDA-MoE is trained and sampled as LLaDA (its own profile, `families/llada_moe.py`, differs in names): the checks
are the same, with its architecture, its [MASK] 156,895 and its LoRA pattern (q/k/v/o of every layer, no router,
expert or `lm_head`).

What only the real checkpoint can show (tests/test_llada.py shows the rest on the tiny LLaDA):
1. the profile recognises its config (architecture LLaDAModelLM) and loading without `trust_remote_code` is refused
   with dgtune's one-line error, and with it the folder loads through dgtune's own loader
   (`gpu_check_common.refuse_then_load`: the profile's class, the family's [MASK]);
2. the LoRA pattern adapts exactly q/k/v/attn_out/ff_proj/up_proj/ff_out of all 32 blocks (224 modules) and not the
   head `model.transformer.ff_out`;
3. dgtune's family calls (`encode` -> `decode_hidden` -> `lm_logits`) give the checkpoint's own
   `model(input_ids=[prompt ; canvas]).logits` on the canvas (bf16, max abs difference printed, < 0.05 asserted);
4. dgtune's loss with `objective=llada` equals the GUIDELINES transcription on identical draws (bf16, rel 1e-2);
5. dgtune's sampler (`sampler=topk_confidence_mask`, temperature 1) draws the tokens of the generate.py
   transcription at `--steps` steps for a `--gen`-token answer (greedy; bf16 ties may differ: agreement printed,
   >= 0.95 asserted).
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
    from dgtune.diffusion.model_calls import decode_hidden, encode, lm_logits
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.models.family import family_of
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample
    from dgtune.train import apply_lora
    from llada_reference import guidelines_sft_loss, llada_generate
    from gpu_check_common import refuse_then_load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gen", type=int, default=32)
    args = p.parse_args()
    model, tok = refuse_then_load(args.path, "llada")
    family = family_of(model)
    assert family.name in ("llada", "llada_moe"), family.name
    mask_id = family.mask_token_id

    lora = apply_lora(model, compose(["model=diffusiongemma_26b", "lora.r=4"]).lora)
    adapted = {n for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    if family.name == "llada":
        assert len(adapted) == 7 * model.config.n_layers, len(adapted)
    else:
        assert len(adapted) == 4 * model.config.num_hidden_layers, len(adapted)
    assert not any(re.search(r"transformer\.ff_out$|lm_head$|mlp\.gate$|experts", n) for n in adapted)
    print(f"[{family.name}] 2 LoRA on {len(adapted)} modules, head, router and experts untouched")
    lora.unload()

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 4?"}], add_generation_prompt=True,
                                  tokenize=True, return_tensors="pt").cuda()
    canvas = torch.randint(100, 5000, (1, args.gen), device="cuda")
    with torch.no_grad():
        cache, _ = encode(model, ids)
        ours = lm_logits(model, decode_hidden(model, canvas, cache)).float()
        ref = model(input_ids=torch.cat([ids, canvas], 1)).logits[:, ids.shape[1]:].float()
    diff = float((ours - ref).abs().max())
    print(f"[llada] 3 family calls vs model(): max |logit diff| {diff:.4f}")
    assert diff < 0.05

    answer = torch.randint(100, 5000, (args.gen,), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": torch.tensor([ids.shape[1]],
             device="cuda"), "canvas": answer[None]}
    ocfg = ObjectiveConfig(**{k: v for k, v in compose(["objective=llada"]).objective.items()})
    with torch.no_grad():
        out = denoising_loss(model, batch, ocfg, torch.Generator("cuda").manual_seed(5), model.config.vocab_size,
                             mask_id)["loss"]
        g = torch.Generator("cuda").manual_seed(5)
        t, u = torch.rand(1, generator=g, device="cuda"), torch.rand(1, args.gen, generator=g, device="cuda")
        ref_loss = guidelines_sft_loss(model, [ids[0]], [answer], t, u, mask_id)
    print(f"[llada] 4 loss {float(out):.5f} vs GUIDELINES {float(ref_loss):.5f}")
    torch.testing.assert_close(out.float(), ref_loss.float(), rtol=1e-2, atol=1e-3)

    model.config.canvas_length = args.gen
    scfg = SamplerConfig(strategy="topk_confidence", noise="mask", commit="argmax", t_min=1.0, t_max=1.0,
                         max_steps=args.steps, mask_token_id=mask_id, self_conditioning=False)
    with torch.no_grad():
        mine = sample(model, ids, scfg, torch.Generator("cuda").manual_seed(0), -1, tok.pad_token_id, args.gen).tokens
    theirs = _generate_on_device(model, ids, args.steps, args.gen, mask_id, llada_generate)
    agree = float((mine[:, : args.gen] == theirs).float().mean())
    print(f"[llada] 5 sampler vs generate.py: {agree:.3f} of tokens agree")
    assert agree >= 0.95
    print("[llada] all done")


def _generate_on_device(model, ids, steps, gen, mask_id, fn):
    """The transcription builds its canvas on the CPU; run it with the model on the GPU by moving its inputs."""
    class OnDevice(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m(x.cuda())
            out.logits = out.logits.cpu()
            return out

    with torch.no_grad():
        return fn(OnDevice(model), ids.cpu(), steps, gen, mask_id).cuda()


if __name__ == "__main__":
    main()
