"""SDAR (JetAstra/SDAR) on the tiny SDAR built in code (dgtune/models/tiny_sdar.py): SDAR-4B-Chat's weight names and
what the LoRA pattern hits, the two mask forms its attention reads (bool in eval, a flex-attention BlockMask in
training), and dgtune's `objective=sdar` against a plain transcription of SDAR's training step on identical draws,
a redrawn answer included, and the block sampler against a transcription of SDAR's `generate.py` (train -> eval -> export through the CLI, the trust error and checkpointing:
tests/test_families.py)."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import sharpened

from dgtune.config import compose
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.model_calls import decode_hidden, encode
from dgtune.diffusion.objective import ObjectiveConfig, corrupt_sdar
from dgtune.models.family import family_of
from dgtune.models.tiny_sdar import REAL_WEIGHT_NAMES, build_tiny_sdar
from dgtune.sampling.config import SamplerConfig
from dgtune.sampling.sampler import sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "ci"))
from sdar_reference import sdar_generate, sdar_loss  # noqa: E402

BLOCK = 4


@pytest.fixture(scope="module")
def sdar():
    model, tok = build_tiny_sdar(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, block_size=BLOCK)
    return sharpened(model), tok


def test_profile_names_and_lora_pattern(sdar):
    """The tiny model carries SDAR-4B-Chat's weight names; the LoRA pattern adapts the attention's q/k/v/o and the
    MLP's gate/up/down, never the q/k norms, the layer norms, the embedding or `lm_head`."""
    model, _ = sdar
    assert family_of(model).name == "sdar" and family_of(model).block_diffusion
    names = {n for n, _ in model.named_parameters()}
    assert {n.replace("layers.35.", "layers.1.") for n in REAL_WEIGHT_NAMES} <= names
    pattern = family_of(model).lora_target_modules
    hit = {m for m in (n.rsplit(".", 1)[0] for n in REAL_WEIGHT_NAMES) if re.fullmatch(pattern, m)}
    assert hit == ({f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
                   | {f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
                   | {"model.layers.35.mlp.down_proj"})


def test_attention_reads_a_bool_mask_in_eval_and_a_block_mask_in_training(sdar):
    """dgtune hands SDAR's attention the form it reads in each mode (modeling_sdar.py: `attention_mask.bool()` in
    eval, `flex_attention(block_mask=...)` in training): the [x_t ; x_0] states are the same in both modes; the
    tiny model, like the real one, refuses a tensor mask in training; and an additive mask (LLaDA2's form) would be
    read backwards by SDAR's `.bool()`."""
    from dgtune.models.families.llada2 import block_causal_mask, mask_argument

    model, _ = sdar
    g = torch.Generator().manual_seed(1)
    prompt, canvas, clean = (torch.randint(7, 40, (2, n), generator=g) for n in (6, 10, 10))
    with torch.no_grad():
        cache, _ = encode(model, prompt)
        evaluated = decode_hidden(model, canvas, cache, clean_canvas=clean)
        model.train()
        try:
            trained = decode_hidden(model, canvas, cache, clean_canvas=clean)
            allowed = block_causal_mask(8, BLOCK, "cpu")[None].expand(2, -1, -1)
            assert hasattr(mask_argument(model, allowed), "mask_mod")
            with pytest.raises(TypeError, match="BlockMask"):
                model.model(canvas, attention_mask=allowed[:, None])
        finally:
            model.eval()
    torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-5)
    assert mask_argument(model, allowed).dtype == torch.bool
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    assert torch.equal(additive.bool(), ~allowed)  # what SDAR's .bool() would make of LLaDA2's form


def _draws(seed, b, l, tries=10):
    """dgtune's draw order for objective=sdar: t [b] and the corruption [b, l], then t and [b, l] per retry."""
    g = torch.Generator().manual_seed(seed)
    t, u = [], []
    for _ in range(tries):
        t.append(torch.rand(b, generator=g))
        u.append(torch.rand(b, l, generator=g))
    return torch.stack(t), torch.stack(u)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_loss_equals_sdar_transcription(sdar, mode):
    """fp32, identical draws, right-padded prompts of 5, 9 and 13 tokens (their answers start inside a block) and
    11-token answers, one with template positions (labels -100 in SDAR's batch): dgtune's `objective=sdar` loss equals the transcription of SDAR's training step (packed
    [x_t ; x_0] under its block-diffusion mask, p = (1 - 1e-3) t + 1e-3, an answer with nothing masked redrawn,
    cross-entropy / p summed / the batch's answer tokens) to 1e-6, on a draw where one answer needed a second try;
    with the model in either mode (bool mask or BlockMask)."""
    model, tok = sdar
    lens, l, b = [5, 9, 13], 11, 3
    given = torch.zeros(b, l, dtype=torch.bool)
    given[2, [1, 2, 5, 8]] = True  # a template on the last answer: 7 free positions against 11, 11

    def first_try_empty(s):  # some answer has nothing masked by its first try
        t0, u0 = (x[0] for x in _draws(s, b, l, 1))
        return not bool(((u0 < (1 - 1e-3) * t0[:, None] + 1e-3) & ~given).any(-1).all())

    seed = next(s for s in range(500) if first_try_empty(s))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, 40, (n,), generator=g) for n in lens]
    answers = [torch.randint(7, 40, (l,), generator=g) for _ in lens]
    input_ids = torch.full((b, max(lens)), tok.pad_token_id)
    attention = torch.zeros(b, max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)], attention[i, : len(p)] = p, 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "prompt_len": torch.tensor(lens),
             "canvas": torch.stack(answers), "canvas_keep": given}
    cfg = ObjectiveConfig(**{k: v for k, v in compose(["objective=sdar"]).objective.items()})
    model.train(mode == "train")
    try:
        out = denoising_loss(model, batch, cfg, torch.Generator().manual_seed(seed), model.config.vocab_size,
                             tok.mask_token_id)
        t, u = _draws(seed, b, l)
        ref = sdar_loss(model, prompts, answers, t, u, tok.mask_token_id, tok.pad_token_id, BLOCK, given)
    finally:
        model.eval()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-7)
    assert float(out["loss"]) > 0


def test_an_answer_empty_after_ten_tries_gets_one_free_position_masked():
    """SDAR's redraws and last resort: 4096 answers with one free position each (the rest template). Replaying the
    draws (first mask, then a level and a mask per retry while a row is empty), each row's level is that of its last
    try; every answer ends with exactly its free position masked, the few still empty after 10 tries (about 1 in
    1024) by the forced mask."""
    b, l = 4096, 3
    clean = torch.full((b, l), 9)
    free_at = torch.arange(b) % l
    keep = torch.ones(b, l, dtype=torch.bool)
    keep[torch.arange(b), free_at] = False
    t0 = torch.rand(b, generator=torch.Generator().manual_seed(3))
    noisy, corrupted, t = corrupt_sdar(clean, t0, 4, torch.Generator().manual_seed(4), keep)
    draws = torch.Generator().manual_seed(4)
    hit = torch.rand(b, l, generator=draws)[torch.arange(b), free_at] < (1 - 1e-3) * t0 + 1e-3  # [b]
    want = t0.clone()
    for _ in range(9):
        empty = ~hit
        if not bool(empty.any()):
            break
        tk = torch.rand(b, generator=draws)
        uk = torch.rand(b, l, generator=draws)[torch.arange(b), free_at]
        want = torch.where(empty, tk, want)
        hit = torch.where(empty, uk < (1 - 1e-3) * tk + 1e-3, hit)
    assert 0 < int((~hit).sum()) < 20  # rows that only the forced mask reaches
    torch.testing.assert_close(t, want, rtol=0, atol=0)
    assert torch.equal(corrupted, ~keep) and torch.equal(noisy == 4, ~keep)


@pytest.mark.parametrize("p_len,steps", [(8, 4), (9, 4), (10, 2)])
def test_block_sampler_equals_sdar_generate(sdar, p_len, steps):
    """SDAR's own sampler (`generate.py` `block_diffusion_generate`, its defaults: temperature 1 multinomial draws,
    `low_confidence_dynamic` at 0.85, blocks of 4), transcribed: dgtune's `sampler=sdar_block` draws the same tokens
    for the same seed, one prompt at a time, up to the first EOS, with prompts aligned to a block and ending inside
    one (the answer fills whole blocks: SDAR decodes the last block whole, dgtune only the answer's part of it). With 2
    steps per block and a prompt of 10, SDAR's first block has 2 [MASK]s and commits 2 per step, so its top-k never
    reaches a prompt position (docs/extending.md: where it would, SDAR overwrites the prompt). The settings come from
    `sampler=sdar_block`: LLaDA2's extra pass over a finished block (`sampler.complete_block_pass`) would draw."""
    model, tok = sdar
    w = model.lm_head.weight
    saved = w.detach().clone()
    gen = 24 - p_len
    cfg = SamplerConfig(**{k: v for k, v in compose(["sampler=sdar_block"]).sampler.items() if k != "name"})
    cfg = SamplerConfig(**{**cfg.__dict__, "max_steps": steps, "block_length": BLOCK, "mask_token_id": tok.mask_token_id})
    try:
        with torch.no_grad():
            w[tok.eos_token_id] *= 1.5  # some answers end early
        for seed in range(6):
            prompt = torch.randint(7, 40, (1, p_len), generator=torch.Generator().manual_seed(100 + seed))
            ours = sample(model, prompt, cfg, torch.Generator().manual_seed(seed), tok.eos_token_id, tok.pad_token_id,
                          gen).tokens[0]
            x = sdar_generate(model, prompt, tok.mask_token_id, gen, BLOCK, steps, 0.85, [tok.eos_token_id],
                              torch.Generator().manual_seed(seed))[0, p_len:]
            end = int((x == tok.eos_token_id).nonzero()[0]) + 1 if (x == tok.eos_token_id).any() else gen
            assert torch.equal(ours[:end], x[:end]), (seed, ours, x)
    finally:
        with torch.no_grad():
            w.copy_(saved)
