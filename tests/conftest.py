"""Shared fixtures: offline mode and a small random DiffusionGemma built on the fly."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a randomly initialised tiny DiffusionGemma with canvas 24, in eval mode."""
    from dgtune.models.tiny import build_tiny_model

    model, tok = build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, canvas_length=24)
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def tiny_short():
    """(model, tokenizer): the `tiny` sizes with canvas 8, so that answers take several canvases; eval mode."""
    from dgtune.models.tiny import build_tiny_model

    model, tok = build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, canvas_length=8)
    model.eval()
    return model, tok


def randomise_lora_b(model, scale: float = 0.05, seed: int = 0):
    """Give every LoRA B matrix random values (peft initialises B to zero, so a fresh adapter changes nothing);
    returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model
