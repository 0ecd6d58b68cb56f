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
