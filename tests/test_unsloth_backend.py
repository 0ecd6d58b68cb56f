"""`model.backend=unsloth`: refused at once (one line naming model.backend) where it cannot run; on a CUDA machine
with unsloth installed, the bundled model loads through unsloth's loader and trains with dgtune's objective."""

import importlib.util

import pytest
import torch

from dgtune.config import compose
from dgtune.models.load import load_model
from dgtune.models.unsloth_backend import BackendUnavailableError

HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_unsloth_backend_fails_at_once():
    cfg = compose(["model=tiny", "model.backend=unsloth"]).model
    with pytest.raises(BackendUnavailableError) as err:
        load_model(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.backend=unsloth") and "CUDA" in msg


def test_bad_backend_values():
    with pytest.raises(ValueError, match="model.backend must be"):
        load_model(compose(["model=tiny", "model.backend=vllm"]).model)
    with pytest.raises(ValueError, match="model.backend=unsloth loads saved models"):
        load_model(compose(["model=shaped26b", "model.backend=unsloth"]).model)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_UNSLOTH), reason="needs a CUDA GPU and unsloth "
                    "(pip install 'dgtune[unsloth]' in its own environment)")
@pytest.mark.parametrize("quantization", ["null", "4bit"])
def test_unsloth_loads_bundled_model_and_dgtune_trains_it(quantization):
    from dgtune.diffusion.loss import denoising_loss
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.train import apply_lora
    from test_shaped_e2e import padded_batch

    cfg = compose(["model=tiny", "model.backend=unsloth", f"model.quantization={quantization}",
                   "model.dtype=bfloat16"])
    model, tok = load_model(cfg.model)
    ref, _ = load_model(compose(["model=tiny", "model.dtype=bfloat16"]).model)
    assert type(model).__name__ == "DiffusionGemmaForBlockDiffusion" and getattr(model, "_unsloth_slow_diffusion")
    ids = torch.tensor([[2, 10, 11, 12, 13]], device="cuda")
    with torch.no_grad():
        got = model.model.encoder(input_ids=ids).last_hidden_state.float()
        want = ref.cuda().model.encoder(input_ids=ids).last_hidden_state.float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    lora = apply_lora(model, cfg.lora)
    batch = {k: v.cuda() for k, v in padded_batch(tok, ["sudoku:0003021410002040"], ["12"], 88).items()}
    with torch.autocast("cuda", torch.bfloat16):
        out = denoising_loss(lora, batch, ObjectiveConfig(), torch.Generator("cuda").manual_seed(0),
                             model.config.text_config.vocab_size, tok.mask_token_id)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and any(p.grad is not None for p in lora.parameters() if p.requires_grad)
