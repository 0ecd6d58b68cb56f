"""The Dream family (dgtune/models/families/dream.py) on the tiny Dream built in code (dgtune/models/tiny_dream.py):
the real checkpoint's names and what the LoRA pattern hits, the shifted logits, dgtune's loss against a plain
transcription of Dream's published SFT loss on identical draws, its sampler against a transcription of Dream's
`diffusion_generate` (train -> eval -> export through the CLI, the trust error and checkpointing:
tests/test_families.py)."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import loss_against_transcription, sharpened

from dgtune.config import compose
from dgtune.diffusion.model_calls import decode_hidden, encode, lm_logits
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
    return sharpened(model), tok


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
    out, ref = loss_against_transcription(model, tok, "dream", dream_sft_loss)
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
