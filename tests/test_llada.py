"""The LLaDA family (dgtune/models/families/llada.py) on the tiny LLaDA built in code (dgtune/models/tiny_llada.py):
the real checkpoint's names and what the LoRA pattern hits, dgtune's loss against a plain transcription of LLaDA's
published SFT loss on identical draws, and its sampler against a transcription of LLaDA's `generate.py` (train ->
eval -> export through the CLI, the trust error and checkpointing: tests/test_families.py)."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import loss_against_transcription

from dgtune.config import compose
from dgtune.models.family import family_of
from dgtune.models.tiny_llada import REAL_WEIGHT_NAMES, build_tiny_llada

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "ci"))
from llada_reference import guidelines_sft_loss, llada_generate  # noqa: E402


@pytest.fixture(scope="module")
def llada():
    model, tok = build_tiny_llada(seed=0, d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=64)
    return model.float(), tok


def test_profile_names_and_lora_pattern(llada):
    """The tiny model carries LLaDA-8B-Instruct's weight names; the LoRA pattern adapts every block's attention and
    MLP linears and never the output head, which shares its last name (`ff_out`) with each block's down projection."""
    model, _ = llada
    assert family_of(model).name == "llada"
    names = {n for n, _ in model.named_parameters()}
    assert set(REAL_WEIGHT_NAMES) <= names | {n.replace("blocks.0.", "blocks.1.") for n in names}
    pattern = family_of(model).lora_target_modules
    hit = {n.removesuffix(".weight") for n in REAL_WEIGHT_NAMES if re.fullmatch(pattern, n.removesuffix(".weight"))}
    assert hit == {f"model.transformer.blocks.0.{m}" for m in
                   ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")}
    assert not re.fullmatch(pattern, "model.transformer.ff_out")  # the head
    from dgtune.train import apply_lora

    lora = apply_lora(model, compose(["model=llada_tiny", "lora.r=4"]).lora)
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and ".blocks." in n for n in adapted)
    lora.unload()


def test_loss_equals_llada_guidelines_transcription(llada):
    """fp32, identical draws: dgtune's `objective=llada` loss (right-padded prompts of different lengths, canvas
    positions after each prompt) equals the transcription to 1e-6."""
    model, tok = llada
    out, ref = loss_against_transcription(model, tok, "llada", guidelines_sft_loss)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-7)
    assert float(out["loss"]) > 0


@pytest.mark.parametrize("steps,block", [(1, 0), (3, 0), (5, 0), (3, 4), (6, 4), (4, 6)])
def test_sampler_equals_llada_generate_transcription(llada, steps, block):
    """dgtune's sampler (`sampler=topk_confidence_mask`, temperature 1 so that its confidence is softmax(logits)'s)
    draws LLaDA's own low-confidence remasking tokens, row by row, on the tiny LLaDA: one block, and LLaDA's
    semi-autoregressive blocks (`sampler.block_length`: 3 blocks of 4 with 1 or 2 steps each, 2 blocks of 6 with 2)."""
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample

    model, tok = llada
    l = 12
    model.config.canvas_length = l
    prompts = torch.randint(7, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    cfg = SamplerConfig(strategy="topk_confidence", noise="mask", commit="argmax", t_min=1.0, t_max=1.0,
                        max_steps=steps, mask_token_id=tok.mask_token_id, self_conditioning=False, block_length=block)
    eos = -1  # no EOS stop: compare whole canvases
    ours = sample(model, prompts, cfg, torch.Generator().manual_seed(0), eos, tok.pad_token_id, l).tokens
    for i in range(prompts.shape[0]):
        ref = llada_generate(model, prompts[i: i + 1], steps, l, tok.mask_token_id, block or None)
        assert torch.equal(ours[i: i + 1, :l], ref), (i, ours[i], ref)
    if block:  # steps that do not split over the blocks: one clear error, as LLaDA's assert
        with pytest.raises(ValueError, match="block_length.*split evenly"):
            sample(model, prompts, SamplerConfig(**{**cfg.__dict__, "max_steps": steps + 1}),
                   torch.Generator().manual_seed(0), eos, tok.pad_token_id, l)
