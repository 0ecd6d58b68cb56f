"""Sliding-window layers: in training the decoder sees the same prompt keys/values (and mask) as when sampling.

Training encodes prompt + response + padding of a right-padded batch; sampling encodes each prompt alone. A
sliding-window cache keeps only the last W-1 tokens of what was encoded, so without care the training decoder's
sliding layers lose the prompt (or see padding) once the padded length passes the window.
"""

import pytest
import torch

import dgtune.diffusion.loss as loss_mod
from dgtune.diffusion.model_calls import decode, decode_hidden, encode, lm_logits
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.models.shaped import build_shaped_model

WINDOW = 6  # the cache keeps W-1 = 5 prompt tokens; prompts below are 3..13 tokens, sequences up to 21


@pytest.fixture(scope="module")
def shaped_small():
    """A 26B-shaped model (5 sliding : 1 full, window 6) at a tiny width and a 64-id vocabulary, fp32, eval."""
    model, tok = build_shaped_model(vocab_size=64, seed=0, hidden_size=32, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, global_head_dim=16, intermediate_size=32,
                                    num_experts=8, top_k_experts=2, moe_intermediate_size=16, sliding_window=WINDOW,
                                    canvas_length=8)
    model.eval()
    return model, tok


def padded_batch(prompt_lens, resp_lens, canvas_length, vocab, seed=0):
    """A right-padded training batch (as dgtune.data.collate_train builds it) of random token rows."""
    g = torch.Generator().manual_seed(seed)
    s = max(p + r for p, r in zip(prompt_lens, resp_lens))
    b = len(prompt_lens)
    input_ids = torch.zeros(b, s, dtype=torch.long)
    attention_mask = torch.zeros(b, s, dtype=torch.long)
    canvas = torch.ones(b, canvas_length, dtype=torch.long)  # EOS-filled
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        row = torch.randint(7, vocab, (p + r,), generator=g)
        input_ids[i, : p + r], attention_mask[i, : p + r] = row, 1
        canvas[i, :r] = row[p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_len": torch.tensor(prompt_lens),
            "canvas": canvas}


def training_vs_sampling(model, monkeypatch, ar_weight):
    """Decoder logits of `denoising_loss` on a right-padded batch vs. decoding each row after its prompt alone."""
    vocab, l = model.config.text_config.vocab_size, model.config.canvas_length
    batch = padded_batch([3, 9, 13], [8, 6, 8], l, vocab)
    assert batch["input_ids"].shape[1] > WINDOW  # the padded length passes the window

    calls = []

    def recording_decode(*args, **kwargs):
        out = decode_hidden(*args, **kwargs)
        calls.append((args[1], lm_logits(args[0], out)))  # (canvas [b, l], logits [b, l, v])
        return out

    monkeypatch.setattr(loss_mod, "decode_hidden", recording_decode)
    cfg = ObjectiveConfig(kind="uniform", self_cond_p=0.0, ar_weight=ar_weight)
    with torch.no_grad():
        loss_mod.denoising_loss(model, batch, cfg, torch.Generator().manual_seed(1), vocab, None)
    (noisy, train_logits), = calls
    for i, p in enumerate(batch["prompt_len"].tolist()):  # sampling: the prompt alone, canvas right after it
        with torch.no_grad():
            cache, _ = encode(model, batch["input_ids"][i : i + 1, :p])
            positions = torch.arange(p, p + l)[None]
            ref = decode(model, noisy[i : i + 1], cache, decoder_position_ids=positions)
        torch.testing.assert_close(train_logits[i : i + 1], ref, atol=1e-5, rtol=0, msg=f"row {i} (prompt {p})")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ar_weight", [1.0, 0.0])  # encoder over the whole sequence / over the prompts only
def test_training_decoder_sees_the_prompt_as_sampling_does(shaped_small, monkeypatch, ar_weight, attn):
    model, _ = shaped_small
    assert "sliding_attention" in model.config.text_config.layer_types
    model.set_attn_implementation(attn)
    try:
        training_vs_sampling(model, monkeypatch, ar_weight)
    finally:
        model.set_attn_implementation("sdpa")


def test_full_attention_model_keeps_its_cache_and_2d_mask(tiny, monkeypatch):
    """Without sliding layers the encoder's own cache and a 2D mask are used, as before, and match sampling."""
    from dgtune.diffusion.model_calls import decoder_context, training_cache

    model, _ = tiny
    assert "sliding_attention" not in model.config.text_config.layer_types
    assert training_cache(model) is None
    cache, _ = encode(model, torch.randint(7, 40, (2, 10)))
    same, mask = decoder_context(model, cache, torch.tensor([4, 10]), 5)
    assert same is cache and mask.shape == (2, 15) and mask.sum(1).tolist() == [9, 15]
    training_vs_sampling(model, monkeypatch, 1.0)
