"""Answers longer than one canvas: rows encode to several blocks, training picks one block per row with the prompt
and the clean earlier blocks in the decoder's cache (as sampling builds it canvas by canvas), the chunked loss and
sliding-window layers follow, and a model trained this way samples its 2-3 canvas answers back."""

import copy

import pytest
import torch

import dgtune.diffusion.loss as loss_mod
from dgtune.data import collate_train, encode_rows
from dgtune.diffusion.model_calls import decode, decode_hidden, encode, lm_logits
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.models.shaped import build_shaped_model
from dgtune.sampling.sampler import SamplerConfig, sample

L = 8  # canvas length: answers of 12-20 tokens (+ EOS) take 2-3 canvases


class LongTask:
    """Just what `encode_rows` reads of a task: answers up to `max_canvases` canvases."""

    name, use_template = "long", False

    def __init__(self, max_canvases=3):
        self.canvas_length, self.max_canvases = L, max_canvases


def long_rows(n=4, seed=0, lengths=(12, 20)):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (k,), generator=g))
        rows.append({"task": "long", "prompt": f"rev:{digits[::-1]}" + "1" * i, "response": digits})
    return rows


def test_rows_encode_to_blocks_and_too_long_answers_fail_clearly(tiny_short):
    _, tok = tiny_short
    rows = long_rows(6)
    items = encode_rows(tok, rows, L, LongTask())
    eos = tok.eos_token_id
    for row, it in zip(rows, items):
        r = len(row["response"]) + 1
        assert it["n_blocks"] == -(-r // L) and it["n_blocks"] in (2, 3)
        assert tok.decode(it["canvas"][: r - 1]) == row["response"] and it["canvas"][r - 1:] == [eos] * (it["n_blocks"] * L - r + 1)
    batch = collate_train(items, tok.pad_token_id)
    assert batch["canvas"].shape == (6, 3 * L) and batch["block_count"].tolist() == [it["n_blocks"] for it in items]
    assert "block_count" not in collate_train(encode_rows(tok, [{"task": "t", "prompt": "a", "response": "12"}], L),
                                              tok.pad_token_id)  # one canvas: the batch is as before
    with pytest.raises(ValueError, match=r"row \d \(long\): response has \d+ tokens with EOS, more than 2 canvas"):
        encode_rows(tok, long_rows(6, lengths=(16, 20)), L, LongTask(max_canvases=2))


def recorded_training_logits(model, batch, monkeypatch, seed, **cfg):
    """(picked blocks' noisy canvases [b, l], decoder logits [b, l, v], context lengths [b]) of one loss call."""
    calls = []

    def recording_decode(*args, **kwargs):
        out = decode_hidden(*args, **kwargs)
        calls.append((args[1], lm_logits(args[0], out), kwargs["decoder_position_ids"][:, 0]))
        return out

    monkeypatch.setattr(loss_mod, "decode_hidden", recording_decode)
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        loss_mod.denoising_loss(model, batch, ObjectiveConfig(self_cond_p=0.0, **cfg), torch.Generator().manual_seed(seed),
                                vocab, None)
    monkeypatch.undo()
    (noisy, logits, ctx), = calls
    return noisy, logits, ctx


def sampling_logits(model, batch, i, ctx, noisy):
    """Decoder logits for row i's canvas after the sampler's cache: the prompt encoded alone, then each earlier
    canvas encoded in turn at its positions (as `sample` and generate() do)."""
    p = int(batch["prompt_len"][i])
    ids = batch["input_ids"][i : i + 1]
    cache, _ = encode(model, ids[:, :p])
    for start in range(p, ctx, L):
        cache, _ = encode(model, ids[:, start : start + L], cache=cache, position_ids=torch.arange(start, start + L)[None])
    return decode(model, noisy[None], cache, decoder_position_ids=torch.arange(ctx, ctx + L)[None])


@pytest.fixture(scope="module")
def shaped_sliding():
    """A 26B-shaped model (5 sliding : 1 full layers, window 6 < prompt + earlier blocks), tiny widths, canvas 8."""
    model, tok = build_shaped_model(vocab_size=64, seed=0, hidden_size=32, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, global_head_dim=16, intermediate_size=32,
                                    num_experts=8, top_k_experts=2, moe_intermediate_size=16, sliding_window=6,
                                    canvas_length=L)
    return model.eval(), tok


@pytest.mark.parametrize("which", ["full_attention", "sliding_window"])
@pytest.mark.parametrize("ar_weight", [1.0, 0.0])
def test_block_k_is_decoded_after_the_prompt_and_the_clean_earlier_blocks(tiny_short, shaped_sliding, monkeypatch,
                                                                          which, ar_weight):
    model, tok = tiny_short if which == "full_attention" else shaped_sliding
    batch = collate_train(encode_rows(tok, long_rows(6), L, LongTask()), tok.pad_token_id)
    picked = set()
    for seed in range(3):
        noisy, logits, ctx = recorded_training_logits(model, batch, monkeypatch, seed, ar_weight=ar_weight)
        again = recorded_training_logits(model, batch, monkeypatch, seed, ar_weight=ar_weight)
        assert torch.equal(ctx, again[2]) and torch.equal(noisy, again[0])  # the block choice is seeded
        blocks = (ctx - batch["prompt_len"]) // L
        assert ((ctx - batch["prompt_len"]) % L == 0).all() and (blocks < batch["block_count"]).all()
        picked |= set(blocks.tolist())
        for i in range(6):
            ref = sampling_logits(model, batch, i, int(ctx[i]), noisy[i])
            torch.testing.assert_close(logits[i : i + 1], ref, atol=1e-5, rtol=0, msg=f"seed {seed} row {i}")
    assert picked == {0, 1, 2}  # every block position of the 3-block answers was trained


def test_chunked_loss_and_gradients_equal_the_plain_path_with_blocks(tiny_short):
    model, tok = tiny_short
    model = copy.deepcopy(model).train()
    batch = collate_train(encode_rows(tok, long_rows(5), L, LongTask()), tok.pad_token_id)
    vocab = model.config.text_config.vocab_size
    outs = []
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        out = loss_mod.denoising_loss(model, batch, ObjectiveConfig(loss_chunk=chunk), torch.Generator().manual_seed(4),
                                      vocab, None)
        out["loss"].backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    for k in a:
        torch.testing.assert_close(b[k].detach(), a[k].detach(), rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5, msg=n)


def test_trained_on_blocks_the_model_samples_its_multi_canvas_answers(tiny_short):
    """Overfit the canvas-8 tiny model on three answers of 12-20 tokens (2-3 canvases) with the block objective,
    then sample them back over several canvases, in reference mode (= generate()) and fast mode."""
    model, tok = tiny_short
    model = copy.deepcopy(model).train()
    rows = [{"task": "long", "prompt": f"rev:{d[::-1]}", "response": d}
            for d in ("401928374650", "73829104655123987", "11223344556677889900")]  # 12, 17, 20 digits
    items = encode_rows(tok, rows, L, LongTask())
    assert sorted({it["n_blocks"] for it in items}) == [2, 3]
    batch = collate_train(items * 8, tok.pad_token_id)  # 24 rows: each step trains most of the 8 blocks
    vocab = model.config.text_config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for step in range(60):
        out = loss_mod.denoising_loss(model, batch, ObjectiveConfig(), torch.Generator().manual_seed(step), vocab, None)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    for mode in ("reference", "fast"):
        cfg = SamplerConfig(mode=mode, max_steps=16, max_canvases=3)
        for row, it in zip(rows, items):
            prompt = torch.tensor([it["prompt"]])
            res = sample(model, prompt, cfg, torch.Generator().manual_seed(0), tok.eos_token_id, tok.pad_token_id, L,
                         row_seeds=None if mode == "reference" else torch.tensor([7]))
            assert res.tokens.shape[1] == it["n_blocks"] * L, mode  # as many canvases as the answer needs
            if mode == "reference":  # generate()'s draws, token for token, on whatever kernels this CPU has
                torch.manual_seed(0)
                ref = model.generate(prompt, max_new_tokens=3 * L, max_denoising_steps=16, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id).sequences[:, prompt.shape[1]:]
                assert torch.equal(ref, res.tokens), (row["response"], ref, res.tokens)
            # Learned: the memorised answer, up to a near-tie of this small overfit model, which may go either way
            # with another CPU's kernels (AVX512-BF16 machines flip one) or the fast mode's own per-row draws.
            text = tok.decode(res.tokens[0], skip_special_tokens=True)
            assert len(text) == len(row["response"]), (mode, text)
            assert sum(a == b for a, b in zip(text, row["response"])) >= 0.85 * len(text), (mode, text)
