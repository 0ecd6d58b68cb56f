"""`model.quantization` (4bit / 8bit through bitsandbytes): what is quantised on DiffusionGemma, tying, LoRA steps,
the fused decoder on a quantised base, and the one-line failure where bitsandbytes cannot run.

The bitsandbytes tests skip (saying why) where the extra or its backend on this device is absent."""

import copy
import sys

import pytest
import torch

from dgtune.config import compose
from dgtune.memory import TextShape, quantised_parameters
from dgtune.models.quant import QUANT_MODES, QuantizationUnavailableError, backend_problem, quant_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBLEM = {m: backend_problem(QUANT_MODES[m], DEVICE) for m in QUANT_MODES}
needs = {m: pytest.mark.skipif(PROBLEM[m] is not None, reason=str(PROBLEM[m])) for m in QUANT_MODES}


def small_model():
    """A tiny DiffusionGemma with two layers (one sliding, one full: a v_proj-less k=v layer) and canvas 8."""
    from dgtune.models.tiny import build_tiny_model

    return build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                            moe_intermediate_size=32, canvas_length=8,
                            layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def quantised():
    """{'4bit' / '8bit': (quantised model, original model, tokenizer)} for the modes whose backend works here."""
    from dgtune.models.quant import quantised_copy

    model, tok = small_model()
    return {m: (quantised_copy(model, m), model, tok) for m in QUANT_MODES if PROBLEM[m] is None}


def test_quant_mode_values():
    assert quant_mode(None) is None and quant_mode("none") is None
    assert quant_mode("4bit").kwargs["bnb_4bit_quant_type"] == "nf4"
    assert quant_mode("4bit").kwargs["bnb_4bit_use_double_quant"] is True
    with pytest.raises(ValueError, match="model.quantization"):
        quant_mode("3bit")


def test_without_bitsandbytes_loading_fails_at_once(monkeypatch):
    """No bitsandbytes: load_model stops before building anything, with one line naming model.quantization."""
    from dgtune.models.load import load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    cfg = compose(["model=shaped26b", "model.quantization=4bit"]).model
    with pytest.raises(QuantizationUnavailableError) as err:
        load_model(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.quantization=4bit:") and "bitsandbytes" in msg


def test_transformers_default_skip_list_quantises_no_layer_linear():
    """Why dgtune passes its own skip list: transformers' default skips every tied key, and DiffusionGemma ties each
    encoder layer weight to its decoder layer, so no attention / MLP / router linear of a layer would be quantised."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    model, _ = small_model()
    skip = get_keys_to_not_convert(model)
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    layer_linears = [n for n in linears if ".layers." in n and "vision" not in n]
    assert layer_linears and not [n for n in layer_linears if should_convert_module(n, skip)]
    from dgtune.models.quant import SKIP_MODULES

    ours = [n for n in layer_linears if should_convert_module(n, SKIP_MODULES)]
    assert ours == [n for n in layer_linears if "router" not in n]


@pytest.mark.parametrize("mode", list(QUANT_MODES))
def test_layer_linears_quantised_and_tied(quantised, mode):
    """Every attention / dense-MLP linear of encoder and decoder layers is a bitsandbytes module holding the SAME
    quantised weight object in both; router, LM head, embedding and the 3-D experts stay 16/32-bit; the count of
    quantised text parameters is dgtune.memory's `quantised_parameters` (what eval/bench/memory_plan.py assumes)."""
    if PROBLEM[mode]:
        pytest.skip(PROBLEM[mode])
    import bitsandbytes as bnb

    from dgtune.models.quant import quantised_summary

    q, orig, _ = quantised[mode]
    cls = getattr(bnb.nn, QUANT_MODES[mode].bnb_module)
    enc, dec = q.model.encoder.language_model.layers, q.model.decoder.layers
    for e, d in zip(enc, dec):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj") + (("self_attn.v_proj",) if d.self_attn.v_proj is not None else ()):
            em, dm = e.get_submodule(name), d.get_submodule(name)
            assert isinstance(dm, cls) and isinstance(em, cls), name
            assert em.weight is dm.weight, f"{name}: encoder and decoder weights are no longer tied"
        assert type(d.router.proj) is torch.nn.Linear
        assert d.experts.gate_up_proj.dim() == 3 and d.experts.gate_up_proj.dtype.is_floating_point
        assert e.experts.gate_up_proj is d.experts.gate_up_proj
    assert type(q.lm_head) is torch.nn.Linear and q.lm_head.weight is q.model.decoder.embed_tokens.weight
    counts = quantised_summary(q)
    vision = sum(m.in_features * m.out_features for n, m in orig.named_modules()
                 if type(m) is torch.nn.Linear and "vision" in n)
    assert counts["quantised"] == quantised_parameters(TextShape.from_config(orig.config.text_config)) + vision
    assert counts["experts_16bit"] == sum(p.numel() for p in orig.parameters() if p.dim() == 3)


@pytest.mark.parametrize("mode", list(QUANT_MODES))
def test_dense_weight_is_what_the_layer_applies(quantised, mode):
    """`dense_weight` (what the fused decoder reads) reproduces the bitsandbytes layer's output."""
    if PROBLEM[mode]:
        pytest.skip(PROBLEM[mode])
    from dgtune.models.quant import dense_weight

    q, orig, _ = quantised[mode]
    layer = q.model.decoder.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features, device=DEVICE, dtype=torch.bfloat16)
    w = dense_weight(layer)
    ref = orig.model.decoder.layers[0].self_attn.q_proj.weight.to(w.device)
    assert w.shape == ref.shape and (w.float() - ref).abs().max() < 0.2 * ref.abs().max()  # NF4 / int8 error
    torch.testing.assert_close(layer(x).float(), (x.float() @ w.float().t()), atol=0.05, rtol=0.05)


@needs["4bit"]
def test_4bit_lora_steps_train_and_fused_decoder_matches(quantised):
    """QLoRA: a few LoRA steps on a 4-bit base change only the adapters and lower the loss on a fixed batch; the
    fused decoder on the tuned 4-bit model gives transformers' decoder logits."""
    from dgtune.diffusion.loss import denoising_loss
    from dgtune.diffusion.model_calls import decode, encode
    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.sampling.fast import NO_MASKS
    from dgtune.sampling.fused_decoder import FusedDecoder
    from dgtune.train import apply_lora
    from test_shaped_e2e import padded_batch

    q, _, tok = quantised["4bit"]
    model = apply_lora(copy.deepcopy(q), compose([]).lora)
    base_before = model.get_base_model().model.decoder.layers[0].self_attn.q_proj.weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = padded_batch(tok, ["sudoku:0003021410002040", "sudoku:1200340000120000"], ["4123321", "12"], 8)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    cfg = ObjectiveConfig()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast(DEVICE, torch.bfloat16):
            out = denoising_loss(model, batch, cfg, torch.Generator(DEVICE).manual_seed(0),
                                 q.config.text_config.vocab_size, tok.mask_token_id)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert torch.equal(model.get_base_model().model.decoder.layers[0].self_attn.q_proj.weight, base_before)

    model.eval()
    prompts = batch["input_ids"][:, :6]
    canvas = batch["canvas"]
    positions = torch.arange(6, 6 + canvas.shape[1], device=DEVICE)[None]
    with torch.no_grad():
        cache, _ = encode(model, prompts)
        ref = decode(model, canvas, cache, None, decoder_attention_mask=NO_MASKS, decoder_position_ids=positions)
        fused = FusedDecoder(model, torch.bfloat16)
        got = fused(canvas, fused.prepare_cache(cache), fused.rope_tables(positions), None)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(got, ref, atol=0.15, rtol=0.05)
