"""The memory path: chunked losses (`objective.loss_chunk`) and gradient checkpointing give the plain path's loss and
gradients (fp32, 1e-5), on a small DiffusionGemma whose soft-cap bites (large LM-head logits, small cap)."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DiffusionGemmaForBlockDiffusion

from dgtune.config import compose
from dgtune.diffusion.chunked import linear_cross_entropy
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.objective import ObjectiveConfig, softcap
from dgtune.models.checkpointing import enable_gradient_checkpointing
from dgtune.models.tiny import build_tiny_config
from dgtune.train import apply_lora

VOCAB, CANVAS, MASK_ID = 300, 12, 3
CHUNK = 7  # divides neither the canvas tokens (3 x 12) nor the AR pairs (3 x 18)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def base():
    """A small DiffusionGemma (sliding (window 6) + full attention layers, MoE) with a 300-token vocabulary, soft-cap 5 on
    logits of magnitude ~5-10, so tanh is far from linear."""
    config = build_tiny_config(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16, intermediate_size=32, moe_intermediate_size=16, canvas_length=CANVAS,
                               layer_types=["sliding_attention", "full_attention"])
    config.text_config.final_logit_softcapping = 5.0
    config.text_config.sliding_window = 6  # shorter than the rows: the sliding cache layers drop old columns
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # tied with the embeddings
    return model.train()


def _lora(model):
    """LoRA on the default targets plus the experts, with random (non-zero) A and B so every adapter gets a gradient."""
    cfg = OmegaConf.merge(compose(["recipe=sudoku"]).lora,
                          {"r": 4, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]})
    model = apply_lora(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def _batch(keep: bool):
    """Three right-padded rows (prompt lengths 5, 3, 7, canvas 12), optionally with a template mask."""
    g = torch.Generator().manual_seed(2)
    plen = torch.tensor([5, 3, 7])
    s = int(plen.max()) + CANVAS
    ids = torch.randint(5, VOCAB - 1, (3, s), generator=g)
    am = (torch.arange(s)[None] < (plen + CANVAS)[:, None]).long()
    ids = torch.where(am.bool(), ids, 0)
    canvas = torch.stack([ids[i, p:p + CANVAS] for i, p in enumerate(plen.tolist())])
    batch = {"input_ids": ids, "attention_mask": am, "prompt_len": plen, "canvas": canvas}
    if keep:
        batch["canvas_keep"] = torch.rand(3, CANVAS, generator=g) < 0.3
    return batch


def _loss_and_grads(model, batch, cfg, seed=0):
    model.zero_grad(set_to_none=True)
    out = denoising_loss(model, batch, cfg, torch.Generator().manual_seed(seed), VOCAB, MASK_ID)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(ref, got):
    (out_a, grads_a), (out_b, grads_b) = ref, got
    for k in out_a:
        torch.testing.assert_close(out_b[k].detach(), out_a[k].detach(), **TOL)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], **TOL, msg=n)


OBJECTIVES = {
    "released": dict(),
    "mean_loo": dict(prediction="mean_loo"),
    "masked": dict(kind="masked"),
}


@pytest.mark.parametrize("keep", [False, True], ids=["no_template", "template"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_chunked_loss_matches_plain_lora(base, objective, keep):
    model, batch = _lora(base), _batch(keep)
    kw = dict(OBJECTIVES[objective], self_cond_p=1.0 if keep else 0.5)  # seed 0 gates some rows on, some off
    plain = _loss_and_grads(model, batch, ObjectiveConfig(**kw))
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(plain[1][n].abs().sum() > 0 for n in lora), "every LoRA weight must get a gradient"
    _assert_same(plain, _loss_and_grads(model, batch, ObjectiveConfig(**kw, loss_chunk=CHUNK)))
    _assert_same(plain, _loss_and_grads(model, batch, ObjectiveConfig(**kw, loss_chunk=1000)))  # one chunk


def test_chunked_loss_matches_plain_full_finetune(base):
    """All parameters trainable: the tied LM-head/embedding gradient (canvas CE, AR co-loss and the
    self-conditioning soft embeddings) matches too."""
    model, batch = copy.deepcopy(base), _batch(True)
    plain = _loss_and_grads(model, batch, ObjectiveConfig(self_cond_p=1.0, prediction="mean_loo"))
    _assert_same(plain, _loss_and_grads(model, batch, ObjectiveConfig(self_cond_p=1.0, prediction="mean_loo",
                                                                       loss_chunk=CHUNK)))


def test_linear_cross_entropy_applies_softcap():
    """The chunked CE equals F.cross_entropy on soft-capped logits, and not on raw ones (the cap matters here)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g)
    target, weight = torch.randint(0, 50, (10,), generator=g), torch.rand(10, generator=g)
    got = linear_cross_entropy(h, w, target, weight, 2.0, 3)
    ce = torch.nn.functional.cross_entropy(softcap(h @ w.T, 2.0), target, reduction="none")
    torch.testing.assert_close(got, (ce * weight).sum(), **TOL)
    raw = torch.nn.functional.cross_entropy(h @ w.T, target, reduction="none")
    assert not torch.allclose(got, (raw * weight).sum(), atol=1e-2)


def _count_calls(model):
    """Forward calls of the first encoder and decoder attention module (a checkpointed layer runs twice per step)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts = {"encoder": 0, "decoder": 0}
    for part, layers in (("encoder", core.model.encoder.language_model.layers), ("decoder", core.model.decoder.layers)):
        layers[0].self_attn.register_forward_hook(lambda *_, part=part: counts.__setitem__(part, counts[part] + 1))
    return counts


@pytest.mark.parametrize("chunk", [0, CHUNK])
def test_gradient_checkpointing_matches_plain(base, chunk):
    batch = _batch(True)
    cfg = ObjectiveConfig(self_cond_p=1.0, loss_chunk=chunk)
    model = _lora(base)
    plain = _loss_and_grads(model, batch, cfg)
    enable_gradient_checkpointing(model)
    counts = _count_calls(model)
    ckpt = _loss_and_grads(model, batch, cfg)
    # encoder: forward + replay; decoder: no-grad self-conditioning pass + graded pass + replay
    assert counts == {"encoder": 2, "decoder": 3}
    _assert_same(plain, ckpt)
    model.eval()
    with torch.no_grad():  # no replay outside training
        denoising_loss(model, batch, cfg, torch.Generator().manual_seed(0), VOCAB, MASK_ID)
    assert counts == {"encoder": 3, "decoder": 5}


def test_gradient_checkpointing_with_a_lazily_grown_cache(base):
    """The encoder replay also works on a `DynamicCache()` without config, whose layers are appended as the encoder
    layers write (the full-keys training cache used with sliding-window layers): gradients through the hidden states
    and through the cached keys/values match, and the cache holds each layer's keys once."""
    from transformers import DynamicCache

    from dgtune.diffusion.model_calls import encode

    batch = _batch(False)
    ids, am = batch["input_ids"], batch["attention_mask"]
    model = _lora(base)

    def grads():
        model.zero_grad(set_to_none=True)
        cache, hidden = encode(model, ids, am, cache=DynamicCache())
        assert all(layer.keys.shape[2] == ids.shape[1] for layer in cache.layers)
        kv = sum(layer.keys.pow(2).mean() + layer.values.pow(2).mean() for layer in cache.layers)
        (hidden.pow(2).mean() + kv).backward()
        assert all(layer.keys.shape[2] == ids.shape[1] for layer in cache.layers)  # not appended again by the replay
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    enable_gradient_checkpointing(model)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], **TOL, msg=n)
