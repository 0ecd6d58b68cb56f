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


def sharpened(model, std: float = 0.4, seed: int = 0):
    """`model` (float32) with every matrix redrawn at `std`: at the init's 0.02 every [MASK] position predicts nearly
    the same distribution, and a sampler's rankings and thresholds would be decided by rounding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.float()


def loss_against_transcription(model, tok, objective: str, reference):
    """(dgtune's loss dict, the reference's loss) for `objective=<objective>` on 3 rows with right-padded prompts
    of different lengths and 12-token answers, on identical draws: dgtune's order (t [b], then the corruption
    [b, l]) replayed for `reference(model, prompts, answers, t, u, mask_id)`, a family's published loss
    transcribed (eval/ci/*_reference.py)."""
    import torch

    from dgtune.config import compose
    from dgtune.diffusion.loss import denoising_loss
    from dgtune.diffusion.objective import ObjectiveConfig

    g = torch.Generator().manual_seed(0)
    lens, l, b = [5, 9, 7], 12, 3
    prompts = [torch.randint(7, 40, (n,), generator=g) for n in lens]
    answers = [torch.randint(7, 40, (l,), generator=g) for _ in lens]
    input_ids = torch.full((b, max(lens)), tok.pad_token_id)
    attention = torch.zeros(b, max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)], attention[i, : len(p)] = p, 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "prompt_len": torch.tensor(lens),
             "canvas": torch.stack(answers)}
    cfg = ObjectiveConfig(**{k: v for k, v in compose([f"objective={objective}"]).objective.items()})
    out = denoising_loss(model, batch, cfg, torch.Generator().manual_seed(5), model.config.vocab_size,
                         tok.mask_token_id)
    draws = torch.Generator().manual_seed(5)
    t = torch.rand(b, generator=draws)
    u = torch.rand(b, l, generator=draws)
    return out, reference(model, prompts, answers, t, u, tok.mask_token_id)
