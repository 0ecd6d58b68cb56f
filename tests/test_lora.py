"""LoRA targets: attention + dense MLP of encoder and decoder; router frozen; experts only on request."""

import copy

import torch

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


def _full_finetune(tmp_path, extra):
    from dgtune.train import train

    cfg = compose(["recipe=sudoku_4x4", "lora=none", "trainer.lr=0.001", "trainer.max_steps=2", "trainer.batch_size=4", "task.n_train=16",
                   "task.n_val=4", "task.n_test=4", "eval.at_end=false", "eval.quick_every=0", "trainer.progress_bar=false",
                   "trainer.mixed_precision=no", f"run_dir={tmp_path}", f"data_dir={tmp_path / 'data'}", *extra])
    train(cfg)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "final" / "model.safetensors"))


def test_full_finetune_freezes_the_router_unless_asked(tmp_path):
    from dgtune.models.load import BUNDLED_DIR
    from safetensors.torch import load_file

    base = load_file(str(BUNDLED_DIR / "model.safetensors"))
    tuned = _full_finetune(tmp_path / "frozen", [])
    router = [n for n in base if ".router." in n]
    assert router and all(torch.equal(base[n], tuned[n]) for n in router)
    assert not torch.equal(base["model.decoder.layers.0.self_attn.q_proj.weight"],
                           tuned["model.decoder.layers.0.self_attn.q_proj.weight"])
    trained = _full_finetune(tmp_path / "trained", ["trainer.train_router=true"])
    assert any(not torch.equal(base[n], trained[n]) for n in router)
