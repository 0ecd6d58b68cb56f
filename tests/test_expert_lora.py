"""LoRA on the routed experts (`lora.experts=true`: peft `target_parameters` on the fused 3-D expert weights of the
26B-shaped model): the fused decoder applies the adapted experts (its logits equal transformers' to 1e-4), a saved
adapter reloads to the same logits, and a merged export gives the adapter's outputs."""

import copy

import pytest
import torch

from conftest import randomise_lora_b
from dgtune.config import compose
from dgtune.diffusion.model_calls import decode, encode
from dgtune.models.shaped import build_shaped_model
from dgtune.sampling.fast import NO_MASKS
from dgtune.sampling.fused_decoder import FusedDecoder
from dgtune.train import apply_lora


@pytest.fixture(scope="module")
def shaped():
    model, tok = build_shaped_model(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, global_head_dim=16, intermediate_size=32, num_experts=8,
                                    top_k_experts=2, moe_intermediate_size=16, sliding_window=6, canvas_length=8)
    return model.eval(), tok


def _adapted(model, experts=True, seed=0):
    cfg = compose(["model=shaped26b", f"lora.experts={str(experts).lower()}", "lora.r=4"]).lora
    return randomise_lora_b(apply_lora(copy.deepcopy(model), cfg), 0.1, seed).eval()


def _logits(model, decoder=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(7, 40, (3, 10), generator=g)
    canvas = torch.randint(0, 64, (3, 8), generator=g)
    positions = torch.arange(10, 18)[None]
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        if decoder is None:
            return decode(model, canvas, cache, None, decoder_attention_mask=NO_MASKS, decoder_position_ids=positions)
        return decoder(canvas, decoder.prepare_cache(cache), decoder.rope_tables(positions), None)


def test_expert_lora_targets_every_layers_experts_and_only_them(shaped):
    model, _ = shaped
    lora = _adapted(model)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names)
    for stack in ("encoder.language_model", "model.decoder"):
        for i in range(6):
            layer = [n for n in names if f"{stack}.layers.{i}.experts" in n]
            assert len(layer) == 4, (stack, i, layer)  # A and B for gate_up_proj and down_proj
    assert not any("router" in n for n in names)


def test_fused_decoder_applies_the_expert_adapters(shaped):
    model, _ = shaped
    lora = _adapted(model)
    ref = _logits(lora)
    torch.testing.assert_close(_logits(lora, FusedDecoder(lora, torch.float32)), ref, atol=1e-4, rtol=1e-4)
    without = _adapted(model, experts=False)  # attention / MLP adapters only
    base = _logits(model)
    assert (ref - base).abs().max() > 1e-2 and (_logits(without) - ref).abs().max() > 1e-3


def test_saved_expert_adapter_reloads_to_the_same_logits(shaped, tmp_path):
    from peft import PeftModel

    model, _ = shaped
    lora = _adapted(model)
    lora.save_pretrained(str(tmp_path / "adapter"))
    again = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(again), _logits(lora), atol=1e-6, rtol=1e-6)


def test_merged_expert_adapter_gives_the_adapters_outputs(shaped, tmp_path):
    from dgtune.export import merge_adapter

    model, _ = shaped
    lora = _adapted(model)
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = merge_adapter(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(lora), atol=1e-4, rtol=1e-4)
