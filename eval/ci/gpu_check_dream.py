"""GPU check of the Dream family on the real weights, for a machine with a GPU and a local copy of
Dream-org/Dream-v0-Instruct-7B (the lent machines reach no hub: copy the folder there first). Not a test.

    python eval/ci/gpu_check_dream.py /path/to/Dream-v0-Instruct-7B [--steps 8] [--gen 32]

What only the real checkpoint can show (tests/test_dream.py shows the rest on the tiny Dream):
1. the profile recognises its config (architecture DreamModel) and loading without `trust_remote_code` is refused
   with dgtune's one-line error, and with it the folder loads through dgtune's own loader
   (`gpu_check_common.refuse_then_load`: the profile's class, the family's [MASK]);
2. the LoRA pattern adapts exactly q/k/v/o and gate/up/down of every layer (7 per layer) and not `lm_head`;
3. dgtune's family calls (`encode` -> `decode_hidden` -> `lm_logits`) give the checkpoint's own logits shifted by
   one, `model(input_ids=[prompt ; canvas]).logits[:, p - 1 : p - 1 + l]` (bf16, max abs difference printed,
   < 0.05 asserted);
4. dgtune's loss with `objective=dream` equals the DreamOn transcription on identical draws (bf16, rel 1e-2);
5. dgtune's sampler (`sampler=dream_entropy`) draws the tokens of the checkpoint's own
   `diffusion_generate(alg="entropy", temperature=0)` at `--steps` steps for a `--gen`-token answer (bf16 ties may
   differ: agreement printed, >= 0.95 asserted), and of the transcription in eval/ci/dream_reference.py.
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
    from dream_reference import dream_generate, dream_sft_loss
    from gpu_check_common import refuse_then_load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gen", type=int, default=32)
    args = p.parse_args()
    model, tok = refuse_then_load(args.path, "dream")
    assert family_of(model).name == "dream"
    mask_id = 151666

    lora = apply_lora(model, compose(["model=diffusiongemma_26b", "lora.r=4"]).lora)
    adapted = {n for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == 7 * model.config.num_hidden_layers, len(adapted)
    assert not any(re.search(r"lm_head$|embed_tokens$", n) for n in adapted)
    print(f"[dream] 2 LoRA on {len(adapted)} modules, head and embedding untouched")
    lora.unload()

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].cuda()
    p_len = ids.shape[1]
    canvas = torch.randint(100, 5000, (1, args.gen), device="cuda")
    with torch.no_grad():
        cache, _ = encode(model, ids)
        ours = lm_logits(model, decode_hidden(model, canvas, cache)).float()
        ref = model(input_ids=torch.cat([ids, canvas], 1)).logits[:, p_len - 1: p_len - 1 + args.gen].float()
    diff = float((ours - ref).abs().max())
    print(f"[dream] 3 family calls vs model() shifted by one: max |logit diff| {diff:.4f}")
    assert diff < 0.05

    answer = torch.randint(100, 5000, (args.gen,), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": torch.tensor([p_len],
             device="cuda"), "canvas": answer[None]}
    ocfg = ObjectiveConfig(**{k: v for k, v in compose(["objective=dream"]).objective.items()})
    with torch.no_grad():
        out = denoising_loss(model, batch, ocfg, torch.Generator("cuda").manual_seed(5), model.config.vocab_size,
                             mask_id)["loss"]
        g = torch.Generator("cuda").manual_seed(5)
        t, u = torch.rand(1, generator=g, device="cuda"), torch.rand(1, args.gen, generator=g, device="cuda")
        ref_loss = dream_sft_loss(model, [ids[0]], [answer], t, u, mask_id)
    print(f"[dream] 4 loss {float(out):.5f} vs DreamOn {float(ref_loss):.5f}")
    torch.testing.assert_close(out.float(), ref_loss.float(), rtol=1e-2, atol=1e-3)

    model.config.canvas_length = args.gen
    scfg = SamplerConfig(strategy="topk_entropy", noise="mask", commit="argmax", schedule="dream", t_min=1.0,
                         t_max=1.0, max_steps=args.steps, mask_token_id=mask_id, self_conditioning=False)
    with torch.no_grad():
        mine = sample(model, ids, scfg, torch.Generator("cuda").manual_seed(0), -1, tok.pad_token_id, args.gen).tokens
        theirs = model.diffusion_generate(ids, max_new_tokens=args.gen, steps=args.steps, temperature=0.0,
                                          alg="entropy", alg_temp=0.0, output_history=False,
                                          return_dict_in_generate=True).sequences[:, p_len:]
        transcribed = dream_generate(model, ids.clone(), args.steps, args.gen, mask_id, alg="entropy")
    agree = float((mine[:, : args.gen] == theirs).float().mean())
    agree_t = float((mine[:, : args.gen] == transcribed).float().mean())
    print(f"[dream] 5 sampler vs diffusion_generate: {agree:.3f} of tokens agree; vs the transcription {agree_t:.3f}")
    assert agree >= 0.95 and agree_t >= 0.95
    print("[dream] all done")


if __name__ == "__main__":
    main()
