"""dgtune.memory: exact parameter counts against built models; LoRA counts against peft; monotone predictions."""

import pytest

from dgtune.memory import TextShape, TrainSettings, lora_parameters, parameter_counts, predict_memory
from dgtune.models.shaped import build_shaped_model


def _text_params(model) -> int:
    """Parameters of the model without the vision stub (tied weights counted once, as `parameters()` does)."""
    return sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)


@pytest.mark.parametrize("sizes", [dict(vocab_size=512), dict(vocab_size=1000, periods=2, hidden_size=64,
                                                                  num_attention_heads=4, num_key_value_heads=2,
                                                                  head_dim=8, global_head_dim=24, intermediate_size=40,
                                                                  num_experts=16, top_k_experts=4,
                                                                  moe_intermediate_size=12)])
def test_parameter_count_matches_model(sizes):
    model, _ = build_shaped_model(**sizes)
    shape = TextShape.from_config(model.config.text_config)
    assert sum(parameter_counts(shape).values()) == _text_params(model)


def test_lora_count_matches_peft():
    from omegaconf import OmegaConf

    from dgtune.train import apply_lora

    model, _ = build_shaped_model(vocab_size=512)
    shape = TextShape.from_config(model.config.text_config)
    lora = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_parameters": [],
                             "target_modules": OmegaConf.load("configs/lora/default.yaml").target_modules})
    peft_model = apply_lora(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(shape, 4) == trainable


def test_prediction_grows_with_batch_and_shrinks_with_chunks_and_checkpointing():
    model, _ = build_shaped_model(vocab_size=4096)
    shape = TextShape.from_config(model.config.text_config)
    base = dict(prompt=64, canvas=32)
    p1, p2 = (predict_memory(shape, TrainSettings(batch=b, **base))["total"] for b in (1, 2))
    assert p2 > p1
    plain = predict_memory(shape, TrainSettings(batch=2, **base))
    chunked = predict_memory(shape, TrainSettings(batch=2, loss_chunk=16, **base))
    ckpt = predict_memory(shape, TrainSettings(batch=2, loss_chunk=16, gradient_checkpointing=True, **base))
    assert plain["logits"] > chunked["logits"] and chunked["activations"] > ckpt["activations"]
    sharded = predict_memory(shape, TrainSettings(batch=2, gpus=8, **base))
    assert sharded["lora_states"] == pytest.approx(plain["lora_states"] / 8)
