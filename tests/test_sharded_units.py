"""FSDP2's shard units (dgtune/sharded.py): DiffusionGemma's tied encoder/decoder layers get their own copies of
the frozen weights they share (torch 2.13 crashes on a grouped unit run twice before backward,
eval/ci/fsdp2_grouped_repro.py); trainable shared weights stay tied and make one unit per pair."""

import copy

import torch

from dgtune.config import compose
from dgtune.models.family import family_of
from dgtune.sharded import shard_groups, untie_frozen_shared
from dgtune.train import apply_lora


def _shared(model):
    seen = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(n)
    return [v for v in seen.values() if len(v) > 1]


def test_lora_model_unties_its_frozen_layer_weights_and_keeps_the_numbers(tiny):
    model, _ = tiny
    units = family_of(model).shard_units
    lora = apply_lora(copy.deepcopy(model), compose(["recipe=sudoku"]).lora)
    assert any("layers" in n for v in _shared(lora) for n in v)  # encoder layer i = decoder layer i
    assert all(len(g) == 2 for g in shard_groups(lora, units))
    before = {n: p.detach().clone() for n, p in lora.named_parameters(remove_duplicate=False)}
    copies = untie_frozen_shared(lora, units)
    assert copies > 0
    assert not any("layers" in n for v in _shared(lora) for n in v)  # only the embedding / head tie is left
    groups = shard_groups(lora, units)
    assert all(len(g) == 1 for g in groups) and len(groups) == 2 * model.config.text_config.num_hidden_layers
    for n, p in lora.named_parameters(remove_duplicate=False):
        assert torch.equal(p, before[n]), n  # the same values under every name
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())


def test_full_finetune_keeps_trainable_ties_as_one_unit(tiny):
    model, _ = tiny
    full = copy.deepcopy(model)
    units = family_of(full).shard_units
    assert untie_frozen_shared(full, units) == 0  # every parameter trains: nothing is copied
    assert all(len(g) == 2 for g in shard_groups(full, units))


def test_fsdp2_refuses_what_it_cannot_run_before_any_work():
    import pytest

    from dgtune.validate import ConfigError, check_config

    base = ["task=sudoku4", "trainer.strategy=fsdp2"]
    check_config(compose(base))  # LoRA + SFT: fine
    for extra, words in ((["method=rl"], "method=sft only"),
                         (["lora=none"], "objective.self_cond_p=0"),
                         (["model=shaped26b", "model.quantization=4bit"], "model.quantization")):
        with pytest.raises(ConfigError, match=words):
            check_config(compose([*base, *extra]))
    check_config(compose([*base, "lora=none", "objective.self_cond_p=0"]))
