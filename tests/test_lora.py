"""LoRA targets: attention + dense MLP of encoder and decoder; router frozen; experts only on request."""

import copy

from omegaconf import OmegaConf

from dgtune.config import compose
from dgtune.train import apply_lora


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_default_targets_and_optional_experts(tiny):
    model, _ = tiny
    cfg = compose(["recipe=sudoku"]).lora
    names = _trainable(apply_lora(copy.deepcopy(model), cfg))
    assert names and all("lora_" in n for n in names)
    for part in ("encoder.language_model", "model.decoder"):
        for proj in ("q_proj", "k_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert any(part in n and proj in n for n in names), (part, proj)
    assert not any("router" in n or "experts" in n or "vision" in n or "self_conditioning" in n for n in names)
    cfg = OmegaConf.merge(cfg, {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 4})
    names = _trainable(apply_lora(copy.deepcopy(model), cfg))
    assert any("experts" in n for n in names) and not any("router" in n for n in names)
