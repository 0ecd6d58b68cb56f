"""The Dream family (dgtune/models/families/dream.py) on the tiny Dream built in code (dgtune/models/tiny_dream.py):
the real checkpoint's names and what the LoRA pattern hits, the shifted logits, dgtune's loss against a plain
transcription of Dream's published SFT loss on identical draws, its sampler against a transcription of Dream's
`diffusion_generate`, and train -> eval -> export through the CLI path."""

import re
import sys
from pathlib import Path

import pytest
import torch

from dgtune.config import compose
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.model_calls import decode_hidden, encode, lm_logits
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.models.family import family_of
from dgtune.models.tiny_dream import REAL_WEIGHT_NAMES, build_tiny_dream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "ci"))
from dream_reference import dream_generate, dream_sft_loss  # noqa: E402


@pytest.fixture(scope="module")
def dream():
    """The tiny Dream with its matrices redrawn at std 0.4: at the init's 0.02 every all-[MASK] position predicts
    nearly the same distribution, and the samplers' rankings would be decided by rounding (entropies 1e-5 apart)."""
    model, tok = build_tiny_dream(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.float(), tok


def test_profile_names_and_lora_pattern(dream):
    """The tiny model carries Dream-v0's weight names; the LoRA pattern adapts every layer's attention and MLP
    linears and never the head `lm_head` or the embedding."""
    model, _ = dream
    assert family_of(model).name == "dream"
    names = {n for n, _ in model.named_parameters()}
    assert set(REAL_WEIGHT_NAMES) <= names
    pattern = family_of(model).lora_target_modules
    modules = {n.rsplit(".", 1)[0] for n in REAL_WEIGHT_NAMES}
    hit = {m for m in modules if re.fullmatch(pattern, m)}
    assert hit == {f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
        {f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    from dgtune.train import apply_lora

    lora = apply_lora(model, compose(["model=dream_tiny", "lora.r=4"]).lora)
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and ".layers." in n for n in adapted)
    lora.unload()


def test_canvas_logits_are_the_previous_positions(dream):
    """The family calls read each canvas token's prediction at the position before it, as Dream's own
    `torch.cat([logits[:, :1], logits[:, :-1]], 1)` does: the first answer token from the last prompt token."""
    model, _ = dream
    g = torch.Generator().manual_seed(3)
    prompt, canvas = torch.randint(7, 40, (2, 6), generator=g), torch.randint(7, 40, (2, 5), generator=g)
    with torch.no_grad():
        cache, _ = encode(model, prompt)
        ours = lm_logits(model, decode_hidden(model, canvas, cache))  # [2, 5, v]
        full = model(torch.cat([prompt, canvas], 1)).logits  # [2, 11, v] unshifted
    torch.testing.assert_close(ours, full[:, 5:10])
    assert not torch.allclose(ours, full[:, 6:11])


def test_loss_equals_dream_transcription(dream):
    """fp32, identical draws: dgtune's `objective=dream` loss (right-padded prompts of different lengths) equals
    the transcription of DreamOn's trainer to 1e-6, including the shift, 1 / t and the division by the batch's
    masked count."""
    model, tok = dream
    g = torch.Generator().manual_seed(0)
    lens, l, b = [5, 9, 7], 12, 3
    prompts = [torch.randint(7, 40, (n,), generator=g) for n in lens]
    answers = [torch.randint(7, 40, (l,), generator=g) for _ in lens]
    s = max(lens)
    input_ids = torch.full((b, s), tok.pad_token_id)
    attention = torch.zeros(b, s, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)], attention[i, : len(p)] = p, 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "prompt_len": torch.tensor(lens),
             "canvas": torch.stack(answers)}
    cfg = ObjectiveConfig(**{k: v for k, v in compose(["objective=dream"]).objective.items()})
    out = denoising_loss(model, batch, cfg, torch.Generator().manual_seed(5), model.config.vocab_size,
                         tok.mask_token_id)
    draws = torch.Generator().manual_seed(5)  # dgtune's order: t [b], then the corruption [b, l]
    t = torch.rand(b, generator=draws)
    u = torch.rand(b, l, generator=draws)
    ref = dream_sft_loss(model, prompts, answers, t, u, tok.mask_token_id)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-7)
    assert float(out["loss"]) > 0


@pytest.mark.parametrize("alg,strategy", [("entropy", "topk_entropy"), ("maskgit_plus", "topk_confidence"),
                                          ("topk_margin", "topk_margin")])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_sampler_equals_dream_generate_transcription(dream, alg, strategy, steps):
    """dgtune's sampler (Dream's schedule, temperature 1 so that its scores are softmax(logits)'s) draws the tokens
    of Dream's `diffusion_generate` at temperature 0, row by row, for each of its three confidence rules."""
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample

    model, tok = dream
    l = 12
    model.config.canvas_length = l
    prompts = torch.randint(7, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    cfg = SamplerConfig(strategy=strategy, noise="mask", commit="argmax", schedule="dream", t_min=1.0, t_max=1.0,
                        max_steps=steps, mask_token_id=tok.mask_token_id, self_conditioning=False)
    ours = sample(model, prompts, cfg, torch.Generator().manual_seed(0), -1, tok.pad_token_id, l).tokens  # no EOS stop
    for i in range(prompts.shape[0]):
        ref = dream_generate(model, prompts[i: i + 1].clone(), steps, l, tok.mask_token_id, alg=alg)
        assert torch.equal(ours[i: i + 1, :l], ref), (i, ours[i], ref)


def test_dream_schedule_counts():
    """Dream's per-step counts for 12 masked positions: int(n (1 - s / t)) on linspace(1, 1e-3, steps + 1), the
    rest at the last step; the even schedule (LLaDA's) beside it."""
    from dgtune.sampling.strategies import dream_schedule, even_schedule

    def counts(fn, steps, n=12):
        left, out = torch.tensor([n]), []
        for j in range(steps):
            k = fn(left, steps - j, steps)
            out.append(int(k))
            left = left - k
        return out

    assert counts(dream_schedule, 2) == [5, 7]  # 12 * (1 - 0.5005) = 5.99 -> 5
    assert counts(even_schedule, 2) == [6, 6]
    assert sum(counts(dream_schedule, 5)) == 12 and counts(dream_schedule, 1) == [12]


def test_absorbing_objectives_corrupt_rl_estimates_with_mask():
    """The RL likelihood estimates corrupt with [MASK] for every absorbing objective kind (llada, dream, masked) and
    with random tokens only for uniform noise (they once checked for kind "masked" alone)."""
    from dgtune.rl.likelihood import _corrupt
    from dgtune.sampling import rng

    tokens = torch.arange(10, 42).view(2, 16)
    keys = rng.seed_keys(torch.tensor([3, 4]))
    for kind in ("masked", "llada", "dream"):
        noisy, corrupted = _corrupt(tokens, torch.tensor([0.99, 0.99]), keys, kind, 64, 5, None)
        assert corrupted.any() and (noisy[corrupted] == 5).all(), kind
    noisy, corrupted = _corrupt(tokens, torch.tensor([0.99, 0.99]), keys, "uniform", 64, 5, None)
    assert corrupted.any() and not (noisy[corrupted] == 5).all()


@pytest.mark.trains
def test_dream_tiny_trains_evaluates_and_exports(tmp_path):
    """`recipe=sudoku_4x4 model=dream_tiny objective=dream sampler=dream_entropy`: a few LoRA steps, the report at
    two step counts, and an export of the adapter."""
    import json

    from dgtune.export import main as export
    from dgtune.train import train

    cfg = compose(["recipe=sudoku_4x4", "model=dream_tiny", "objective=dream", "sampler=dream_entropy",
                   "trainer.max_steps=3", "trainer.batch_size=4", "task.n_train=16", "task.n_val=4", "task.n_test=4",
                   "eval.steps=[2,4]", "eval.quick_every=0", "trainer.progress_bar=false", "logger=none",
                   f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}"])
    train(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted({r["steps"] for r in report["rows"]}) == [2, 4]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train/loss"] > 0 for m in metrics if "train/loss" in m)
    export([str(tmp_path / "run"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_dream_checkpoint_without_trust_remote_code_is_one_clear_error(tmp_path):
    """Dream-v0's config (its architecture and model type) in a folder: loading it without
    `model.trust_remote_code=true` fails at once, naming the key and why."""
    import json

    from omegaconf import OmegaConf

    from dgtune.errors import ConfigError
    from dgtune.models.load import load_model

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DreamModel"], "model_type": "Dream",
                                                      "hidden_size": 3584, "vocab_size": 152064}))
    cfg = OmegaConf.merge(compose(["model=diffusiongemma_26b"]).model, {"name_or_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="dream checkpoint.*model.trust_remote_code=true"):
        load_model(cfg)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_gradient_checkpointing_of_the_one_stack_families(family):
    """`trainer.gradient_checkpointing` on the tiny LLaDA and the tiny Dream (LoRA): every layer of the stack is
    replayed in backward (its forward runs twice per graded pass), and the loss and every gradient equal those
    without checkpointing."""
    import copy

    from dgtune.models.checkpointing import enable_gradient_checkpointing
    from dgtune.models.tiny_llada import build_tiny_llada
    from dgtune.train import apply_lora

    if family == "llada":
        base, tok = build_tiny_llada(seed=0, d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=64)
        first = lambda m: m.get_base_model().model.transformer.blocks[0].attn_norm  # noqa: E731
    else:
        base, tok = build_tiny_dream(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
        first = lambda m: m.get_base_model().model.layers[0].input_layernorm  # noqa: E731
    model = apply_lora(copy.deepcopy(base).float(), compose([f"model={family}_tiny", "lora.r=4"]).lora)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # a non-zero adapter, so that every LoRA weight gets a gradient
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = {"input_ids": torch.randint(7, 40, (3, 6), generator=g), "attention_mask": torch.ones(3, 6, dtype=torch.long),
             "prompt_len": torch.tensor([6, 6, 6]), "canvas": torch.randint(7, 40, (3, 10), generator=g)}
    cfg = ObjectiveConfig(**{k: v for k, v in compose([f"objective={family}"]).objective.items()})

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = denoising_loss(model, batch, cfg, torch.Generator().manual_seed(5), base.config.vocab_size,
                             tok.mask_token_id)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain_loss, plain = loss_and_grads()
    enable_gradient_checkpointing(model)
    calls = []
    first(model).register_forward_hook(lambda *_: calls.append(1))  # a module inside the first layer
    ckpt_loss, ckpt = loss_and_grads()
    assert len(calls) == 2  # forward + replay
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
