"""What every model family built in code must do through dgtune's own paths (LLaDA and Dream, the one-stack
families, and LLaDA2 and SDAR, block diffusion; DiffusionGemma's are the rest of the suite): `recipe=sudoku_4x4` with its tiny model trains a few LoRA
steps, evaluates at two step counts and exports; a real checkpoint's config without `model.trust_remote_code=true`
is one clear error; gradient checkpointing replays every layer and changes no number. The per-family facts (names,
LoRA pattern, loss and sampler parity with the family's published code) are in tests/test_llada.py,
tests/test_dream.py and tests/test_llada2.py."""

import copy
import json

import pytest
import torch
from conftest import sharpened

from dgtune.config import compose
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.objective import ObjectiveConfig

# family -> (overrides that train it with its own objective and sampler, a real checkpoint's config.json)
FAMILIES = {
    "llada": (["model=llada_tiny", "objective=llada", "sampler=topk_confidence_mask"],
              {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "vocab_size": 126464}),
    "dream": (["model=dream_tiny", "objective=dream", "sampler=dream_entropy"],
              {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 3584, "vocab_size": 152064}),
    "llada_moe": (["model=llada_moe_tiny", "objective=llada", "sampler=topk_confidence_mask"],
                  {"architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": 2048, "vocab_size": 157184}),
    "llada2": (["model=llada2_tiny", "objective=llada2", "sampler=block_refine"],
               {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_size": 2048,
                "vocab_size": 157184}),
    "sdar": (["model=sdar_tiny", "objective=sdar", "sampler=block_refine"],  # SDAR-4B-Chat's config.json
             {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 2560, "vocab_size": 151936}),
}


@pytest.mark.trains
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_trains_evaluates_and_exports(tmp_path, family):
    """`recipe=sudoku_4x4 model=<family>_tiny objective=<family> sampler=<its sampler>`: a few LoRA steps, the
    report at two step counts, and an export of the adapter."""
    from dgtune.export import main as export
    from dgtune.train import train

    cfg = compose(["recipe=sudoku_4x4", *FAMILIES[family][0], "trainer.max_steps=3", "trainer.batch_size=4",
                   "task.n_train=16", "task.n_val=4", "task.n_test=4", "eval.steps=[2,4]", "eval.quick_every=0",
                   "trainer.progress_bar=false", "logger=none", f"run_dir={tmp_path / 'run'}",
                   f"data_dir={tmp_path / 'data'}"])
    train(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted({r["steps"] for r in report["rows"]}) == [2, 4]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train/loss"] > 0 for m in metrics if "train/loss" in m)
    export([str(tmp_path / "run"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_without_trust_remote_code_is_one_clear_error(tmp_path, family):
    """The real checkpoint's config (its architecture and model type) in a folder: loading it without
    `model.trust_remote_code=true` fails at once, naming the family, the key and why."""
    from omegaconf import OmegaConf

    from dgtune.errors import ConfigError
    from dgtune.models.load import load_model

    (tmp_path / "config.json").write_text(json.dumps(FAMILIES[family][1]))
    cfg = OmegaConf.merge(compose(["model=diffusiongemma_26b"]).model, {"name_or_path": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"{family} checkpoint.*model.trust_remote_code=true"):
        load_model(cfg)


def _tiny(family):
    """(model, tokenizer, a module inside the first layer) of the family's tiny model at test sizes."""
    if family == "llada":
        from dgtune.models.tiny_llada import build_tiny_llada

        model, tok = build_tiny_llada(seed=0, d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=64)
        return model, tok, lambda m: m.get_base_model().model.transformer.blocks[0].attn_norm
    if family == "llada_moe":
        from dgtune.models.tiny_llada_moe import build_tiny_llada_moe

        model, tok = build_tiny_llada_moe(seed=0, hidden_size=32, expert_intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts=4)
        return model, tok, lambda m: m.get_base_model().model.layers[0].input_layernorm
    if family == "llada2":
        from dgtune.models.tiny_llada2 import build_tiny_llada2

        model, tok = build_tiny_llada2(seed=0, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, block_size=4)
        return model, tok, lambda m: m.get_base_model().model.layers[0].input_layernorm
    if family == "sdar":
        from dgtune.models.tiny_sdar import build_tiny_sdar

        model, tok = build_tiny_sdar(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, block_size=4)
        return model, tok, lambda m: m.get_base_model().model.layers[0].input_layernorm
    from dgtune.models.tiny_dream import build_tiny_dream

    model, tok = build_tiny_dream(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    return model, tok, lambda m: m.get_base_model().model.layers[0].input_layernorm


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_and_chunked_loss_of_the_built_families(family):
    """On the tiny model (LoRA), with the family's own objective: the chunked head (`objective.loss_chunk`, no
    [b, l, v] logits) gives the loss and every gradient of full logits; `trainer.gradient_checkpointing` replays
    every layer of the stack in backward (a module inside the first layer runs twice per graded pass), and the loss
    and every gradient equal those without checkpointing."""
    from dgtune.models.checkpointing import enable_gradient_checkpointing
    from dgtune.train import apply_lora

    base, tok, first = _tiny(family)
    model = apply_lora(copy.deepcopy(base).float(), compose([f"model={family}_tiny", "lora.r=4"]).lora)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # a non-zero adapter, so that every LoRA weight gets a gradient
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = {"input_ids": torch.randint(7, 40, (3, 6), generator=g), "attention_mask": torch.ones(3, 6, dtype=torch.long),
             "prompt_len": torch.tensor([6, 6, 6]), "canvas": torch.randint(7, 40, (3, 10), generator=g)}
    objective = next(o for o in FAMILIES[family][0] if o.startswith("objective="))  # the family's own objective
    cfg = ObjectiveConfig(**{k: v for k, v in compose([objective]).objective.items()})

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = denoising_loss(model, batch, cfg, torch.Generator().manual_seed(5), base.config.vocab_size,
                             tok.mask_token_id)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain_loss, plain = loss_and_grads()
    cfg.loss_chunk = 4  # the chunked head: cross-entropies from hidden states, 4 tokens at a time
    chunk_loss, chunked = loss_and_grads()
    cfg.loss_chunk = 0
    torch.testing.assert_close(chunk_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert chunked.keys() == plain.keys()
    for n in plain:
        torch.testing.assert_close(chunked[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
    enable_gradient_checkpointing(model)
    calls = []
    first(model).register_forward_hook(lambda *_: calls.append(1))
    ckpt_loss, ckpt = loss_and_grads()
    assert len(calls) == 2  # forward + replay
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_one_stack_fast_sampler_retires_rows_and_continues_canvases(monkeypatch, family):
    """The fast sampler on a one-stack family, `strategy=threshold` (rows finish at different steps, so finished rows
    are retired from the prompt cache mid-canvas) and answers of two canvases: every denoising pass of the second
    canvas reads each row's [prompt ; its first canvas], and the rows come back in order. (Before `PromptCache`
    selected its own rows, retiring a row raised AttributeError, and a second canvas replaced the prompt.)"""
    from dgtune.models.families import one_stack
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample

    model, tok, _ = _tiny(family)
    model = sharpened(model)  # some positions pass the threshold early, others late
    module = __import__(f"dgtune.models.families.{family}", fromlist=["canvas_hidden"])
    seen = []
    monkeypatch.setattr(module, "canvas_hidden",
                        lambda f, canvas, cache, shift=0: seen.append(cache) or one_stack.canvas_hidden(f, canvas, cache, shift))
    g = torch.Generator().manual_seed(0)
    prompts, l = torch.randint(7, 40, (6, 5), generator=g), 4
    cfg = SamplerConfig(strategy="threshold", threshold=0.5, noise="mask", commit="argmax", max_steps=4,
                        max_canvases=2, mask_token_id=tok.mask_token_id, self_conditioning=False, decoder="transformers")
    out = sample(model, prompts, cfg, torch.Generator().manual_seed(1), tok.eos_token_id, tok.pad_token_id, l)
    assert out.tokens.shape == (6, 2 * l) and len({float(n) for n in out.nfe}) > 1  # rows finished apart
    second = [c for c in seen if c.input_ids.shape[1] > 5]  # (rows with an EOS in their first canvas stop there)
    assert second
    for cache in second:
        rows = [next(i for i in range(6) if torch.equal(prompts[i], r[:5])) for r in cache.input_ids]
        assert torch.equal(cache.input_ids, torch.cat([prompts[rows], out.tokens[rows, :l]], dim=1))
        assert bool(cache.attention_mask.all())


def test_a_tokenizer_without_a_mask_token_gets_the_family_one():
    """A checkpoint whose tokenizer names no mask token (LLaDA's, LLaDA2's) gets the family's [MASK] id
    (`ModelFamily.mask_token_id`), which the objectives and samplers read from `tokenizer.mask_token_id`; a tokenizer
    that names one keeps it; an id outside the vocabulary is one clear error naming the family."""
    import dataclasses

    from dgtune.errors import InputError
    from dgtune.models.families.llada import LLADA
    from dgtune.models.load import with_mask_token
    from dgtune.models.tiny import build_tokenizer

    tok = build_tokenizer()
    own = tok.mask_token_id
    assert with_mask_token(tok, LLADA).mask_token_id == own  # named: kept
    tok.mask_token = None
    assert tok.mask_token_id is None
    family = dataclasses.replace(LLADA, mask_token_id=own + 1)
    assert with_mask_token(tok, family).mask_token_id == own + 1
    tok.mask_token = None
    with pytest.raises(InputError, match="llada tokenizer has no token 999999"):
        with_mask_token(tok, dataclasses.replace(LLADA, mask_token_id=999999))
