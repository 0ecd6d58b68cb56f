"""The block-diffusion family (dgtune/models/families/llada2.py) on the tiny LLaDA2 built in code
(dgtune/models/tiny_llada2.py): LLaDA2.0-mini's names and what the LoRA pattern hits (and SDAR's), the block-causal
and [x_t ; x_0] layouts, dgtune's loss against a plain transcription of dFactory's block-diffusion SFT step on
identical draws, and the block sampler against diffusers 0.42's `LLaDA2Pipeline` + `BlockRefinementScheduler` (the
`parity` extra; skipped without it) for the same seed (train -> eval -> export through the CLI, the trust error and
checkpointing: tests/test_families.py)."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import loss_against_transcription, sharpened

from dgtune.config import compose
from dgtune.diffusion.model_calls import decode_hidden, encode
from dgtune.models.family import FAMILIES, family_of
from dgtune.models.tiny_llada2 import REAL_WEIGHT_NAMES, build_tiny_llada2
from dgtune.sampling.config import SamplerConfig, pad_after_eos
from dgtune.sampling.sampler import sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "ci"))
from llada2_reference import block_causal_4d, llada2_bd_loss  # noqa: E402

BLOCK = 4


@pytest.fixture(scope="module")
def llada2():
    """The tiny LLaDA2 (blocks of 4) with its matrices redrawn at std 0.4, so that confidences differ between
    positions and the samplers' choices are not decided by rounding."""
    model, tok = build_tiny_llada2(seed=0, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                   block_size=BLOCK)
    return sharpened(model), tok


def test_profile_names_and_lora_pattern(llada2):
    """The tiny model carries LLaDA2.0-mini's weight names (the router's `expert_bias` is a buffer); the LoRA pattern
    adapts the attention, the dense first layer's MLP and the shared expert, and never the router `mlp.gate` (a
    prefix of `mlp.gate_proj`), the routed experts, the embedding or `lm_head`. SDAR's profile hits Qwen3's
    attention and MLP linears only."""
    model, _ = llada2
    assert family_of(model).name == "llada2" and family_of(model).block_diffusion
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    tiny = {re.sub(r"experts\.255\.", "experts.3.", n) for n in REAL_WEIGHT_NAMES}  # the tiny model has 4 experts
    assert tiny <= names
    pattern = family_of(model).lora_target_modules
    modules = {n.rsplit(".", 1)[0] for n in REAL_WEIGHT_NAMES}
    hit = {m for m in modules if re.fullmatch(pattern, m)}
    assert hit == ({f"model.layers.{i}.attention.{m}" for i in (0, 1) for m in ("query_key_value", "dense")}
                   | {f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
                   | {f"model.layers.1.mlp.shared_experts.{m}" for m in ("gate_proj", "up_proj", "down_proj")})
    sdar = FAMILIES["sdar"].lora_target_modules
    qwen3 = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_norm",
             "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.norm", "lm_head"]
    assert [m for m in qwen3 if re.fullmatch(sdar, m)] == ["model.layers.0.self_attn.q_proj",
                                                          "model.layers.0.self_attn.o_proj",
                                                          "model.layers.0.mlp.down_proj"]
    from dgtune.train import apply_lora

    lora = apply_lora(model, compose(["model=llada2_tiny", "lora.r=4"]).lora)
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and ".layers." in n and ".experts." not in n.replace("shared_experts", "")
                           for n in adapted)
    lora.unload()


def test_blocks_see_only_earlier_blocks_and_train_beside_the_clean_copy(llada2):
    """Blocks of 4 at absolute positions (prompt 6: the answer's first 2 tokens share block 1 with the prompt's
    tail). Sampling layout: an answer block's states do not change when a later block changes. Training layout
    (`clean_canvas`): they do not change when an earlier block's noisy tokens change, but do when its clean ones do;
    with the clean canvas equal to the noisy one, both layouts agree."""
    model, _ = llada2
    g = torch.Generator().manual_seed(1)
    prompt, canvas = torch.randint(7, 40, (2, 6), generator=g), torch.randint(7, 40, (2, 10), generator=g)
    later = canvas.clone()
    later[:, 6:] = torch.randint(7, 40, (2, 4), generator=g)  # positions 12..15: block 3
    with torch.no_grad():
        cache, _ = encode(model, prompt)
        plain = decode_hidden(model, canvas, cache)  # [2, 10, d]
        torch.testing.assert_close(decode_hidden(model, later, cache)[:, :6], plain[:, :6])
        assert not torch.allclose(decode_hidden(model, later, cache)[:, 6:], plain[:, 6:])
        torch.testing.assert_close(decode_hidden(model, canvas, cache, clean_canvas=canvas), plain,
                                   rtol=1e-5, atol=1e-5)
        noisy = canvas.clone()
        noisy[:, :2] = 3  # block 1's answer tokens (positions 6, 7), noisy copy only
        mixed = decode_hidden(model, noisy, cache, clean_canvas=canvas)
        torch.testing.assert_close(mixed[:, 2:], plain[:, 2:], rtol=1e-5, atol=1e-5)  # later blocks read the clean copy
        clean = canvas.clone()
        clean[:, :2] = 3
        assert not torch.allclose(decode_hidden(model, canvas, cache, clean_canvas=clean)[:, 2:], plain[:, 2:])


def test_loss_equals_dfactory_transcription(llada2):
    """fp32, identical draws, right-padded prompts of 5, 9 and 7 tokens: dgtune's `objective=llada2` loss equals the
    transcription of dFactory's block-diffusion SFT step (micro-batches of one answer, [x_t ; x_0] under its
    block-diffusion mask, p = 0.3 + 0.5 t, / each answer's masked count) to 1e-6."""
    model, tok = llada2

    def reference(model, prompts, answers, t, u, mask_id):
        return llada2_bd_loss(model, prompts, answers, t, u, mask_id, BLOCK)

    out, ref = loss_against_transcription(model, tok, "llada2", reference)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-7)
    assert float(out["loss"]) > 0


class GenerateMask(torch.nn.Module):
    """The tiny LLaDA2 as diffusers' pipeline calls it (a 2-D attention mask), given the block-causal 4-D mask that
    LLaDA2's own `generate()` builds (`block_causal_4d`): the pipeline leaves that conversion to the model's code."""

    def __init__(self, model, block):
        super().__init__()
        self.model, self.block, self.calls = model, block, 0

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls += 1
        return self.model(input_ids, attention_mask=block_causal_4d(attention_mask, self.block),
                          position_ids=position_ids)


@pytest.mark.parametrize("gen,steps,threshold,editing,temperature,eos_boost", [
    (12, 4, 0.95, None, 0.0, 2.0),   # LLaDA2.0's generate(): threshold + top-k floor; prompt 9 + 12 ends mid-block
    (11, 8, 0.3, 0.5, 0.0, 1.0),     # LLaDA2.1's editing: blocks resolved within 8 steps, then edited
    (12, 4, 0.9, None, 1.0, 2.0),    # multinomial draws from the same generator
    (12, 3, 0.95, None, 0.0, 1.5),   # commits per step 2, 1, 1
])
def test_block_sampler_equals_diffusers_pipeline(llada2, monkeypatch, gen, steps, threshold, editing, temperature,
                                                 eos_boost):
    """Prompts of 9 tokens (the first answer block starts inside the prompt's last block), EOS made likely so that
    rows stop early: dgtune's block sampler and diffusers' `LLaDA2Pipeline` + `BlockRefinementScheduler` draw the
    same tokens for the same seed (compared with pad after each row's first EOS, dgtune's output rule), in the
    same number of forward passes."""
    pytest.importorskip("diffusers", reason="diffusers is the `parity` extra")
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    from dgtune.models.families import llada2 as family

    passes = []
    window_hidden = family.window_hidden
    monkeypatch.setattr(family, "window_hidden", lambda *a, **k: passes.append(1) or window_hidden(*a, **k))
    model, tok = llada2
    prompts = torch.randint(7, 40, (16, 9), generator=torch.Generator().manual_seed(0))
    w = model.lm_head.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[tok.eos_token_id] *= eos_boost
        cfg = SamplerConfig(strategy="threshold", noise="mask", commit="argmax" if temperature == 0 else "sample",
                            t_max=temperature or 1.0, t_min=temperature or 1.0, threshold=threshold, max_steps=steps,
                            editing_threshold=editing or 0.0, mask_token_id=tok.mask_token_id)
        ours = sample(model, prompts, cfg, torch.Generator().manual_seed(7), tok.eos_token_id, tok.pad_token_id, gen)
        wrapped = GenerateMask(model, BLOCK)
        pipe = LLaDA2Pipeline(model=wrapped, scheduler=BlockRefinementScheduler())
        pipe.set_progress_bar_config(disable=True)
        out = pipe(input_ids=prompts, use_chat_template=False, gen_length=gen, block_length=BLOCK,
                   num_inference_steps=steps, temperature=temperature, threshold=threshold,
                   editing_threshold=editing, eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id,
                   generator=torch.Generator().manual_seed(7), output_type="seq")
    finally:
        with torch.no_grad():
            w.copy_(saved)
    theirs = pad_after_eos(out.sequences, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(ours.tokens, theirs), (ours.tokens, theirs)
    assert len(passes) == wrapped.calls
    if eos_boost > 1:  # EOS made likely: some rows stop early
        assert (ours.tokens == tok.eos_token_id).any() and (ours.nfe < ours.nfe.max()).any()


def test_block_sampler_keeps_a_canvas_template(llada2):
    """A canvas template (known answer tokens, -1 = free): its tokens are in the output where it has them, every other
    answer position is filled (no [MASK] left, EOS unlikely), and with editing on the known tokens are never rewritten."""
    model, tok = llada2
    prompts = torch.randint(7, 40, (4, 9), generator=torch.Generator().manual_seed(2))
    template = torch.full((4, 10), -1)
    template[:, ::3] = 20  # positions 0, 3, 6, 9 known
    w = model.lm_head.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[tok.eos_token_id] *= 0.0
            w[tok.mask_token_id] *= 0.0
        cfg = SamplerConfig(strategy="threshold", noise="mask", commit="argmax", threshold=0.3, max_steps=8,
                            editing_threshold=0.05, mask_token_id=tok.mask_token_id)
        out = sample(model, prompts, cfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id, 10,
                     template=template).tokens
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert (out[:, ::3] == 20).all()
    assert not (out == tok.mask_token_id).any()


def test_block_sampler_trace_replays_to_its_own_draws(llada2, monkeypatch):
    """`trace=` on the block sampler (`commit=sample`, temperature 0.7, prompts ending inside a block, early EOS):
    replayed whole by RL's `trajectory` estimator, every kept draw scores the log-probability the sampler drew it
    with (under block-causal attention a block's logits ignore the blocks after it), and a row's kept draws are
    exactly its written answer tokens."""
    from dgtune.rl.likelihood import Completions, Trace, trajectory
    from dgtune.sampling import block as block_sampler

    model, tok = llada2
    seen = []
    candidates = block_sampler.candidates
    monkeypatch.setattr(block_sampler, "candidates",
                        lambda *a: seen.append(candidates(*a)) or seen[-1])
    prompts = torch.randint(7, 40, (4, 9), generator=torch.Generator().manual_seed(3))
    cfg = SamplerConfig(strategy="threshold", noise="mask", commit="sample", t_max=0.7, t_min=0.7, threshold=0.6,
                        max_steps=3, mask_token_id=tok.mask_token_id, self_conditioning=False)
    steps = []
    out = sample(model, prompts, cfg, torch.Generator().manual_seed(1), tok.eos_token_id, tok.pad_token_id, 10,
                 trace=steps)
    assert len(steps) == len(seen) > 3
    trace = Trace.from_steps([(torch.arange(4), steps)], 4, 10, cfg, None)
    batch = Completions(prompts, torch.ones_like(prompts), torch.full((4,), 9), out.tokens, None, torch.arange(4), trace)
    with torch.no_grad():
        logp = trajectory(model, batch, None, model.config.vocab_size, tok.mask_token_id).view(4, len(steps), 10)
    kept = trace.drawn.transpose(0, 1)  # [b, k, l]
    assert int(kept.sum()) > 0
    for j, (_, prob) in enumerate(seen):  # prob [b, block]: answer column c sits at block offset (9 + c) % BLOCK
        rows, cols = kept[:, j].nonzero(as_tuple=True)
        torch.testing.assert_close(logp[rows, j, cols], prob[rows, (cols + 9) % BLOCK].float().log(),
                                   rtol=1e-4, atol=1e-4)
    answer = out.tokens != tok.pad_token_id
    assert torch.equal(kept.any(1) | ~answer, torch.ones_like(answer))  # every answer token was a kept draw
