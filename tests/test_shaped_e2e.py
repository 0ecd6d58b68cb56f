"""The 26B-shaped model (dgtune/models/shaped.py): its shape at the real 262,144 vocabulary, LoRA targets and the
fused sampler decoder on it, and train -> eval -> export through the real CLIs (`model=shaped26b task=sudoku4`)."""

import json
import math

import pytest
import torch
from test_cli import SMALL, run_cli

from conftest import randomise_lora_b
from dgtune.config import compose
from dgtune.data import collate_train, encode_rows
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.diffusion.model_calls import decode, encode
from dgtune.models.shaped import build_shaped_model
from dgtune.sampling.fast import build_decoder
from dgtune.sampling.fused_decoder import FusedDecoder
from dgtune.sampling.sampler import SamplerConfig, sample
from dgtune.train import apply_lora

pytestmark = pytest.mark.trains  # trains with trainer.mixed_precision=auto: .ci/run reruns it under auto's other outcome


def test_shaped_model_has_the_26b_shape():
    """At the real vocabulary: 5 sliding : 1 full, k=v full layers with their own head dim and KV heads, 128
    experts top-8 + dense MLP in every layer, soft-cap 30, a 262,144-row tied embedding holding most parameters."""
    cfg = compose(["model=shaped26b"]).model
    model, tok = build_shaped_model(**dict(cfg.sizes))
    tc = model.config.text_config
    sliding_head_dim = model.model.decoder.layers[0].self_attn.head_dim
    assert tc.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert tc.final_logit_softcapping == 30.0 and tc.vocab_size == 262_144
    for layer, kind in zip(model.model.decoder.layers, tc.layer_types):
        att = layer.self_attn
        if kind == "full_attention":  # keys are the values, wider heads, fewer KV heads
            assert att.v_proj is None and att.head_dim == 2 * sliding_head_dim
            assert att.k_proj.out_features == att.head_dim * 1  # one global KV head
        else:
            assert att.v_proj is not None and att.head_dim == sliding_head_dim
            assert att.k_proj.out_features == att.head_dim * 4
        assert layer.experts.num_experts == 128 and layer.router.proj.out_features == 128
        assert layer.mlp.gate_proj.out_features == tc.intermediate_size  # the dense block next to the experts
    assert tc.top_k_experts == 8
    emb = model.model.decoder.embed_tokens.weight
    assert emb.shape == (262_144, tc.hidden_size) and model.lm_head.weight is emb
    n = sum(p.numel() for p in model.parameters())
    assert 10e6 < n < 100e6 and emb.numel() > n / 2
    assert max(tok.get_vocab().values()) < 262_144 and model.config.image_token_id == len(tok) - 1

    # one LoRA training step's loss and gradients at this vocabulary (the CLI test below uses a smaller one)
    lora = apply_lora(model, compose(["model=shaped26b"]).lora)
    batch = padded_batch(tok, ["sudoku:0003021410002040", "sudoku:1200340000120000"], ["4123321414322341", "1"], 24)
    out = denoising_loss(lora, batch, ObjectiveConfig(), torch.Generator().manual_seed(0), 262_144, None)
    out["loss"].backward()
    grads = [p.grad for n, p in lora.named_parameters() if p.requires_grad]
    assert torch.isfinite(out["loss"]) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def padded_batch(tok, prompts, responses, canvas_length):
    """A training batch as dgtune.data builds it from (prompt, response) strings."""
    items = encode_rows(tok, [{"prompt": p, "response": r, "task": "t"} for p, r in zip(prompts, responses)],
                        canvas_length)
    return collate_train(items, tok.pad_token_id)


@pytest.fixture(scope="module")
def shaped_lora():
    """The shaped model at a 64-id vocabulary and window 6 with the default LoRA (random B: the adapters matter)."""
    model, tok = build_shaped_model(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, global_head_dim=16, intermediate_size=32, num_experts=8,
                                    top_k_experts=2, moe_intermediate_size=16, sliding_window=6, canvas_length=8)
    return randomise_lora_b(apply_lora(model, compose(["model=shaped26b"]).lora)).eval(), tok


def test_default_lora_targets_on_shaped_layers(shaped_lora):
    """Every attention projection that exists (no v_proj on full layers) and the dense MLP, in encoder and decoder."""
    model, _ = shaped_lora
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = set()
    for stack in ("model.encoder.language_model", "model.decoder"):
        for i in range(6):
            projs = "qko" if i == 5 else "qkvo"
            expected |= {f"{stack}.layers.{i}.self_attn.{c}_proj" for c in projs}
            expected |= {f"{stack}.layers.{i}.mlp.{c}_proj" for c in ("gate", "up", "down")}
    assert adapted == expected


def test_fused_decoder_on_shaped_model(shaped_lora):
    """The fused decoder handles the shaped layers (sliding caches cut to W-1, k=v, per-layer head dims, LoRA) with
    transformers' logits; its prompt encoder has no sliding windows, so the fast sampler encodes with transformers'
    encoder, and gives the same tokens as with transformers' decoder."""
    model, tok = shaped_lora
    v, l = model.config.text_config.vocab_size, model.config.canvas_length
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(7, v, (3, 13), generator=g)  # longer than the window (6)
    canvas = torch.randint(0, v, (3, l), generator=g)
    positions = torch.arange(13, 13 + l)[None]
    fused = build_decoder(model, SamplerConfig(mode="fast", decoder="auto", decoder_dtype="float32"),
                          torch.device("cpu"))
    assert isinstance(fused, FusedDecoder) and not fused.can_encode
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        assert cache.layers[0].keys.shape[2] == 5 and cache.layers[5].keys.shape[2] == 13
        ref = decode(model, canvas, cache, decoder_position_ids=positions)
        got = fused(canvas, fused.prepare_cache(cache), fused.rope_tables(positions), None)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    outs = {}
    for dec in ("transformers", "fused"):
        cfg = SamplerConfig(mode="fast", max_steps=4, decoder=dec, decoder_dtype="float32")
        outs[dec] = sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id,
                           row_seeds=torch.tensor([3, 5, 7]))
    assert torch.equal(outs["fused"].tokens, outs["transformers"].tokens)


@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_shaped_train_eval_export_cli(tmp_path):
    """A few LoRA steps of the shaped model on 4x4 Sudoku (prompts of 26 tokens > window 16), the base/tuned report
    at 1 and 2 steps, then the adapter and merged exports. The vocabulary is cut to 16,384 rows here (262,144 takes
    ~4x the CPU time, mostly allocating [b, l, v] logits); the test above runs one step at 262,144."""
    run_cli("dgtune.train", ["model=shaped26b", "model.sizes.vocab_size=16384", "task=sudoku4", "trainer.max_steps=3",
                             "eval.steps=[1,2]", "eval.quick_every=0", "run_dir=run", *SMALL, "task.n_test=4",
                             "eval.batch_size=4", "trainer.batch_size=4"], tmp_path)
    run = tmp_path / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    report = json.loads((run / "report.json").read_text())
    assert {r["steps"] for r in report["rows"]} == {1, 2} and {r["model"] for r in report["rows"]} == {"base", "tuned"}

    run_cli("dgtune.export", [str(run), str(tmp_path / "adapter")], tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    run_cli("dgtune.export", [str(run), str(tmp_path / "merged"), "--merge"], tmp_path)
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())["text_config"]
    assert merged["vocab_size"] == 16384 and merged["sliding_window"] == 16
    assert merged["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
