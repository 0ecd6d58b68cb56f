"""The LLaDA-MoE family (dgtune/models/families/llada_moe.py) on the tiny LLaDA-MoE built in code
(dgtune/models/tiny_llada_moe.py): LLaDA-MoE-7B's names and what the LoRA pattern hits, the architecture telling it
from the dense LLaDA that shares its model type, and LLaDA's own loss and sampler (it is trained and sampled as
LLaDA) against the transcriptions of tests/test_llada.py (train -> eval -> export through the CLI, the trust error
and checkpointing: tests/test_families.py)."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import loss_against_transcription, sharpened
from omegaconf import OmegaConf

from dgtune.config import compose
from dgtune.models.family import family_of
from dgtune.models.tiny_llada_moe import REAL_WEIGHT_NAMES, build_tiny_llada_moe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "ci"))
from llada_reference import guidelines_sft_loss, llada_generate  # noqa: E402


@pytest.fixture(scope="module")
def moe():
    """The tiny LLaDA-MoE with its matrices redrawn at std 0.4 (distinct confidences for the sampler's rankings)."""
    model, tok = build_tiny_llada_moe(seed=0, hidden_size=32, expert_intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4)
    return sharpened(model), tok


def test_profile_names_lora_pattern_and_architecture_first(moe):
    """The tiny model carries LLaDA-MoE's weight names; the LoRA pattern adapts q/k/v/o only (never the router
    `mlp.gate`, the experts, the embedding or `lm_head`); a config with LLaDA's model type "llada" and LLaDA-MoE's
    architecture is LLaDA-MoE."""
    model, _ = moe
    assert family_of(model).name == "llada_moe"
    names = {n for n, _ in model.named_parameters()}
    assert {n.replace("experts.63.", "experts.3.") for n in REAL_WEIGHT_NAMES} <= names
    pattern = family_of(model).lora_target_modules
    modules = {n.rsplit(".", 1)[0] for n in REAL_WEIGHT_NAMES}
    assert {m for m in modules if re.fullmatch(pattern, m)} == {f"model.layers.0.self_attn.{m}"
                                                               for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    released = OmegaConf.create({"architectures": ["LLaDAMoEModelLM"], "model_type": "llada"})
    assert family_of(released).name == "llada_moe"
    assert family_of(OmegaConf.create({"architectures": ["LLaDAModelLM"], "model_type": "llada"})).name == "llada"
    from dgtune.train import apply_lora

    lora = apply_lora(model, compose(["model=llada_moe_tiny", "lora.r=4"]).lora)
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and ".self_attn." in n for n in adapted)
    lora.unload()


def test_loss_equals_llada_guidelines_transcription(moe):
    """fp32, identical draws: `objective=llada` on the tiny LLaDA-MoE equals the transcription of LLaDA's
    GUIDELINES.md loss, run through the model's own forward, to 1e-6."""
    model, tok = moe
    out, ref = loss_against_transcription(model, tok, "llada", guidelines_sft_loss)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-7)
    assert float(out["loss"]) > 0


@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_equals_llada_generate_transcription(moe, steps):
    """`sampler=topk_confidence_mask` (temperature 1) draws the tokens of LLaDA's `generate.py` transcription run
    through the tiny LLaDA-MoE's own forward, row by row."""
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample

    model, tok = moe
    l = 12
    model.config.canvas_length = l
    prompts = torch.randint(7, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    cfg = SamplerConfig(strategy="topk_confidence", noise="mask", commit="argmax", t_min=1.0, t_max=1.0,
                        max_steps=steps, mask_token_id=tok.mask_token_id, self_conditioning=False)
    ours = sample(model, prompts, cfg, torch.Generator().manual_seed(0), -1, tok.pad_token_id, l).tokens
    for i in range(prompts.shape[0]):
        ref = llada_generate(model, prompts[i: i + 1], steps, l, tok.mask_token_id)
        assert torch.equal(ours[i: i + 1, :l], ref), (i, ours[i], ref)
