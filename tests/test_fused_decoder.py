"""The fused decoder computes transformers' DiffusionGemma decoder logits (base and base + LoRA), and the fast
sampler gives the same tokens through it as through transformers' decoder."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomise_lora_b
from dgtune.config import compose
from dgtune.diffusion.model_calls import decode, encode
from dgtune.sampling.fast import NO_MASKS, build_decoder
from dgtune.sampling.fused_decoder import FusedDecoder, FusedDecoderUnsupported, gelu_tanh_as_sigmoid
from dgtune.sampling.sampler import SamplerConfig, sample
from dgtune.train import apply_lora


def _inputs(model, b=3, p=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, canvas_len = model.config.text_config.vocab_size, model.config.canvas_length
    prompts = torch.randint(7, 40, (b, p), generator=g)
    canvas = torch.randint(0, v, (b, canvas_len), generator=g)
    sc = 3 * torch.randn(b, canvas_len, v, generator=g)
    return prompts, canvas, sc


def _lora_model(model, seed=0):
    return randomise_lora_b(apply_lora(copy.deepcopy(model), compose(["recipe=sudoku"]).lora), 0.05, seed).eval()


@pytest.fixture(scope="module")
def mixed_layers():
    """A tiny model whose decoder has a sliding-window layer (with its own v_proj and rope) and a full layer."""
    from dgtune.models.tiny import build_tiny_model

    model, _ = build_tiny_model(seed=1, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                moe_intermediate_size=32, canvas_length=24,
                                layer_types=["sliding_attention", "full_attention"])
    return model.eval()


@pytest.mark.parametrize("variant", ["base", "lora", "mixed_layers"])
def test_fused_logits_match_transformers(tiny, mixed_layers, variant):
    model, _ = tiny
    model = {"base": model, "lora": _lora_model(model) if variant == "lora" else None,
             "mixed_layers": mixed_layers}[variant]
    with_lora = variant == "lora"
    prompts, canvas, sc = _inputs(model)
    positions = torch.arange(prompts.shape[1], prompts.shape[1] + canvas.shape[1])[None]
    fused = FusedDecoder(model, torch.float32)
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        kv, rope = fused.prepare_cache(cache), fused.rope_tables(positions)
        for sc_logits in (None, sc):
            ref = decode(model, canvas, cache, sc_logits, decoder_attention_mask=NO_MASKS,
                         decoder_position_ids=positions)
            torch.testing.assert_close(fused(canvas, kv, rope, sc_logits), ref, atol=1e-4, rtol=1e-4)
        if with_lora:  # the adapter matters, and the fused decoder reads it
            base = FusedDecoder(tiny[0], torch.float32)(canvas, kv, rope, sc)
            assert (base - ref).abs().max() > 1e-2
        half = FusedDecoder(model, torch.bfloat16)
        bf16 = half(canvas, half.prepare_cache(cache), rope, sc)
        assert bf16.dtype == torch.float32
        assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("variant", ["base", "lora"])
def test_fused_encoder_matches_transformers_cache(tiny, variant):
    """`encode_prompt` gives the keys / values of transformers' encoder cache (the encoder's own adapter included),
    eager and compiled; a model with sliding-window layers is refused (the sampler then uses transformers')."""
    model = tiny[0] if variant == "base" else _lora_model(tiny[0], seed=3)
    prompts, _, _ = _inputs(model, b=3, p=17)
    fused = FusedDecoder(model, torch.float32)
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        ref = fused.prepare_cache(cache)
        for compiled in (False, True):
            if compiled:
                fused.compile()
            for (k, v), (rk, rv) in zip(fused.encode_prompt(prompts), ref):
                # contiguous, the layout index_select gives when rows retire (else a compiled decoder recompiles)
                assert k.is_contiguous() and v.is_contiguous() and rk.is_contiguous() and rv.is_contiguous()
                torch.testing.assert_close(k, rk, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(v, rv, atol=1e-4, rtol=1e-4)
        if variant == "lora":  # the encoder's adapter matters, and encode_prompt reads it
            base_k = FusedDecoder(tiny[0], torch.float32).encode_prompt(prompts)[-1][0]
            assert (base_k - ref[-1][0]).abs().max() > 1e-2


def test_fused_encoder_refuses_sliding_layers(mixed_layers):
    fused = FusedDecoder(mixed_layers, torch.float32)
    assert not fused.can_encode
    with pytest.raises(FusedDecoderUnsupported, match="sliding"):
        fused.encode_prompt(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("canvases", [1, 3])  # 3: answers over several canvases (the prompt cache then grows)
def test_fast_sampler_same_tokens_through_both_decoders(tiny, canvases):
    model, tok = tiny
    model = _lora_model(model, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # confident logits: steps accept tokens, rows stop at different steps
    try:
        prompts, _, _ = _inputs(model, b=16, seed=2)
        seeds = torch.arange(16) * 11 + 5
        outs = {}
        for dec in ("transformers", "fused"):
            cfg = SamplerConfig(mode="fast", max_steps=8, decoder=dec, decoder_dtype="float32", max_canvases=canvases)
            outs[dec] = sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, row_seeds=seeds)
    finally:
        with torch.no_grad():
            model.lm_head.weight.div_(30.0)
    assert torch.equal(outs["fused"].tokens, outs["transformers"].tokens)
    assert torch.equal(outs["fused"].nfe, outs["transformers"].nfe)
    assert outs["fused"].nfe.min() < outs["fused"].nfe.max()  # rows stopped at different steps (retired rows)
    if canvases > 1:  # some rows did go on to a later canvas
        assert outs["fused"].tokens.shape[1] > model.config.canvas_length


def test_unsupported_model_falls_back(tiny):
    model, _ = tiny
    odd = copy.deepcopy(model)
    odd.config.text_config.attn_logit_softcapping = 50.0
    with pytest.raises(FusedDecoderUnsupported, match="soft-capping"):
        FusedDecoder(odd)
    assert build_decoder(odd, SamplerConfig(mode="fast", decoder="auto"), torch.device("cpu")) is None
    with pytest.raises(FusedDecoderUnsupported):
        build_decoder(odd, SamplerConfig(mode="fast", decoder="fused"), torch.device("cpu"))
    with pytest.raises(ValueError, match="sampler.decoder"):
        build_decoder(model, SamplerConfig(mode="fast", decoder="onnx"), torch.device("cpu"))


def test_decoder_is_reused_until_weights_change(tiny):
    model, _ = tiny
    model = copy.deepcopy(model)
    cfg, cpu = SamplerConfig(mode="fast"), torch.device("cpu")
    first = build_decoder(model, cfg, cpu)
    assert build_decoder(model, cfg, cpu) is first
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
    second = build_decoder(model, cfg, cpu)
    assert second is not first and torch.equal(second.lm_head, model.lm_head.weight)
    assert build_decoder(model, SamplerConfig(mode="fast", decoder_dtype="bfloat16"), cpu) is not second


def test_gelu_as_sigmoid_matches_library_gelu():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.randn(10000)])
    torch.testing.assert_close(gelu_tanh_as_sigmoid(x), F.gelu(x, approximate="tanh"), atol=2e-6, rtol=1e-5)


@pytest.mark.slow  # a subprocess run of the CLI (or torch.compile): pytest -m 'not slow' skips it
def test_compiled_fused_decoder_matches_transformers(mixed_layers):
    """torch.compile'd (sigmoid-form GELU, fp32 matmuls) logits equal transformers' decoder."""
    model = mixed_layers
    prompts, canvas, sc = _inputs(model)
    positions = torch.arange(prompts.shape[1], prompts.shape[1] + canvas.shape[1])[None]
    fused = FusedDecoder(model, torch.float32)
    fused.compile()
    assert fused.act is gelu_tanh_as_sigmoid
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        ref = decode(model, canvas, cache, sc, decoder_attention_mask=NO_MASKS, decoder_position_ids=positions)
        out = fused(canvas, fused.prepare_cache(cache), fused.rope_tables(positions), sc)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_decoder_follows_adapter_toggling(tiny):
    """`with model.disable_adapter():` changes the weights without bumping parameter versions: the cached fused
    decoder must not serve the adapter's weights to the base (eval's base rows run inside that context)."""
    model = _lora_model(tiny[0])
    prompts, canvas, sc = _inputs(model)
    positions = torch.arange(prompts.shape[1], prompts.shape[1] + canvas.shape[1])[None]
    cfg, cpu = SamplerConfig(mode="fast", decoder_dtype="float32"), torch.device("cpu")
    with torch.no_grad():
        tuned = build_decoder(model, cfg, cpu)
        with model.disable_adapter():
            base = build_decoder(model, cfg, cpu)
            cache, _ = encode(model, prompts)
            ref = decode(model, canvas, cache, sc, decoder_attention_mask=NO_MASKS, decoder_position_ids=positions)
            out = base(canvas, base.prepare_cache(cache), base.rope_tables(positions), sc)
        assert base is not tuned
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert build_decoder(model, cfg, cpu) is not base  # adapters back on: the adapted weights again
