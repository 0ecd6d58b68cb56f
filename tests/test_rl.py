"""RL after SFT (`method=rl`, dgtune/rl/): estimators against a plain forward, group advantages, the two policy
losses, rollouts reproducible for a seed, a tiny run that raises a rule reward, exact resume, `init_from` checks."""

import json
import sys
from dataclasses import replace
import types

import pytest
import torch
import torch.nn.functional as F

from dgtune.config import compose
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.errors import InputError
from dgtune.rl import likelihood as L
from dgtune.rl.objectives import group_advantages, grpo_loss, wd1_loss

BASE = ["task=sudoku4", "task.n_train=64", "task.n_val=8", "task.n_test=8", "trainer.progress_bar=false",
        "eval.at_end=false", "eval.quick_every=0", "logger=none", "trainer.log_every=1", "trainer.warmup_steps=0"]


def _completions(tok, n=3, l=24, keep=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [7, 9, 9][:n]
    s = max(lens)
    ids = torch.full((n, s), tok.pad_token_id)
    am = torch.zeros(n, s, dtype=torch.long)
    for i, k in enumerate(lens):
        ids[i, :k] = torch.randint(7, 40, (k,), generator=g)
        am[i, :k] = 1
    canvas = torch.randint(7, 40, (n, l), generator=g)
    return L.Completions(ids, am, am.sum(-1), canvas, keep, torch.arange(n) + 100)


@pytest.mark.parametrize("prediction", ["denoiser", "mean_loo"])
def test_one_pass_estimate_equals_a_plain_forward(tiny, prediction):
    """The one-pass estimate is log_softmax of `model.forward()`'s logits at the completion's tokens, on the canvas
    the estimator noised (and, for mean_loo, converted to the denoiser posterior at t = 1 - eps)."""
    from dgtune.diffusion.objective import loo_to_denoiser_logits

    model, tok = tiny
    batch = _completions(tok)
    obj = ObjectiveConfig(prediction=prediction)
    got = L.one_pass(model, batch, obj, model.config.text_config.vocab_size, None, draws=1, prompt_noise=0.0)
    b, l = batch.canvas.shape
    t = torch.full((b,), 1 - obj.eps)
    keys = L.rng.fold(L.rng.seed_keys(batch.seeds), 0)
    noisy, _ = L._corrupt(batch.canvas, t, L.rng.fold(keys, L.LEVEL_DRAW), "uniform",
                          model.config.text_config.vocab_size, None, None)
    s = batch.input_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, decoder_input_ids=noisy,
                       decoder_attention_mask=torch.cat([batch.attention_mask, torch.ones(b, l, dtype=torch.long)], 1),
                       decoder_position_ids=batch.prompt_len[:, None] + torch.arange(l)[None]).logits.float()
    if prediction == "mean_loo":
        logits = loo_to_denoiser_logits(logits, noisy, t)
    want = F.log_softmax(logits, -1).gather(-1, batch.canvas[..., None]).squeeze(-1)
    assert s == 9 and (noisy != batch.canvas).float().mean() > 0.9
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_estimates_are_row_invariant_and_elbo_varies_less_than_one_level(tiny):
    """A row's estimate does not depend on the other rows of its batch (2 processes = 1); the stratified ELBO over 4
    levels varies less across draws than a single level does."""
    model, tok = tiny
    batch = _completions(tok)
    obj, v = ObjectiveConfig(), model.config.text_config.vocab_size
    with torch.no_grad():
        for est in (L.one_pass, L.elbo):
            whole = est(model, batch, obj, v, None, 2)
            part = est(model, batch.rows(slice(1, 3)), obj, v, None, 2)
            torch.testing.assert_close(part, whole[1:], rtol=1e-4, atol=1e-4)

        def spread(draws):
            reps = [L.sequence_logp(L.elbo(model, replace(batch, seeds=batch.seeds + 1000 * j), obj, v, None, draws),
                                    batch.free) for j in range(8)]
            return torch.stack(reps).var(0).mean()

        assert spread(4) < spread(1)


def test_group_advantages_hand_made():
    adv, flat = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4)
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), rtol=1e-4, atol=1e-4)
    assert flat == 1 and torch.equal(adv[4:], torch.zeros(4))
    adv, _ = group_advantages(torch.tensor([3.0, 1.0]), 2, normalise=False)
    assert adv.tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_policy_losses_push_up_the_better_completion():
    """GRPO (one update: ratio 1) and wd1 both lower the loss by raising the log-likelihood of the completion with
    the positive advantage; clipping and KL statistics are reported."""
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    free = torch.ones(2, 3, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach() - 0.1, adv, free, 0.2, beta=0.0)
    loss.backward()
    assert logp.grad[0].lt(0).all() and logp.grad[1].gt(0).all()  # descent raises row 0, lowers row 1
    assert float(stats["clip_frac"]) == 0.0 and float(stats["kl"]) > 0
    seq = torch.zeros(2, requires_grad=True)
    wd1_loss(seq, adv, 2).backward()
    assert seq.grad[0] < 0 < seq.grad[1]


def _reward_module(monkeypatch, digit="1"):
    mod = types.ModuleType("dgtune_test_reward")
    mod.share_of_digit = lambda row, output: output.count(digit) / max(len(output), 1)
    monkeypatch.setitem(sys.modules, "dgtune_test_reward", mod)
    return "dgtune_test_reward:share_of_digit"


RL = ["method=rl", "trainer.batch_size=16", "trainer.lr=1e-3", "method.group_size=8", "method.rollout_steps=2"]


def _rl_cfg(tmp_path, name, *extra):
    return compose([*BASE, *RL, f"run_dir={tmp_path / name}", f"data_dir={tmp_path / 'data'}", *extra])


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]


@pytest.mark.trains
def test_rl_raises_a_rule_reward_deterministically(tmp_path, monkeypatch):
    """From the bundled base, reward = the share of the answer's characters that are "1" (a rule the base does not
    follow: 0.11 at first): the rollouts' mean reward over the last 4 of 12 steps is well above the first 4, and a
    second run with the same seed logs the same rewards."""
    from dgtune.train import train

    fn = _reward_module(monkeypatch)
    over = [f"method.reward_fn={fn}", "trainer.max_steps=12"]
    train(_rl_cfg(tmp_path, "a", *over))
    rewards = [m["train/reward"] for m in _metrics(tmp_path / "a")]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3, rewards
    assert all(m["train/kl"] >= 0 for m in _metrics(tmp_path / "a")) and _metrics(tmp_path / "a")[-1]["train/kl"] > 0
    train(_rl_cfg(tmp_path, "b", *over))
    assert [m["train/reward"] for m in _metrics(tmp_path / "b")] == rewards


@pytest.mark.trains
def test_rl_rollouts_are_reproducible_and_resume_is_exact(tmp_path, monkeypatch):
    """mu=2 (old-policy estimates, blocks of 2 steps): a run stopped at its step-2 checkpoint and resumed ends with
    the same adapter as the uninterrupted run; both logged the same rewards."""
    import shutil

    from safetensors.torch import load_file

    from dgtune.train import train

    fn = _reward_module(monkeypatch)
    over = [f"method.reward_fn={fn}", "trainer.max_steps=4", "method.mu=2", "trainer.ckpt_every=2",
            "trainer.keep_checkpoints=0", "method.beta=0.05"]
    train(_rl_cfg(tmp_path, "full", *over))
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "final")
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step_0000002")
    train(_rl_cfg(tmp_path, "resumed", *over, "resume=true"))
    a = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [m["train/reward"] for m in full[2:]] == [m["train/reward"] for m in resumed if m["step"] > 2]


def test_init_from_is_checked_before_any_work(tmp_path):
    """A missing folder, a run of another task and a folder without final weights fail with one line naming them."""
    from dgtune.warm_start import check_init_from

    with pytest.raises(InputError, match="no such run folder"):
        check_init_from(compose([*BASE, f"init_from={tmp_path / 'nope'}"]))
    other = tmp_path / "other"
    (other / "final").mkdir(parents=True)
    (other / "final" / "adapter_config.json").write_text("{}")
    from omegaconf import OmegaConf

    OmegaConf.save(compose(["task=countdown"]), other / "config.yaml")
    with pytest.raises(InputError, match=r"task.name='countdown', this run has task.name='sudoku'"):
        check_init_from(compose([*BASE, f"init_from={other}"]))
    (other / "final" / "adapter_config.json").unlink()
    with pytest.raises(InputError, match="holds no adapter"):
        check_init_from(compose([*BASE, f"init_from={other}"]))
