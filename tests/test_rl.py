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


@pytest.mark.parametrize("strategy", ["entropy_bound", "topk_confidence"])
def test_trajectory_estimate_replays_the_samplers_draws(tiny, strategy):
    """The fast sampler's trace, replayed through plain `model.forward()` calls (each step's canvas, the previous
    step's logits / temperature as self-conditioning): the trajectory estimate is log_softmax(logits / T) at the
    drawn tokens; the replayed logits reproduce the sampler's decisions (entropy_bound's acceptance, top-k's
    commits); each kept draw is in the next step's canvas; with last_step=sample the output is the last draws."""
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample
    from dgtune.sampling.stats import step_stats
    from dgtune.sampling.strategies import entropy_bound_accept

    model, tok = tiny
    b, p, l, steps = 4, 9, 24, 3
    prompts = torch.randint(7, 40, (b, p), generator=torch.Generator().manual_seed(3))
    cfg = SamplerConfig(strategy=strategy, max_steps=steps, entropy_bound=3.0, last_step="sample")
    trace = []
    res = sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, l, row_seeds=torch.arange(b) + 5,
                 trace=trace)
    tr = L.Trace.from_steps([(torch.arange(b), trace)], b, l, cfg, None)
    batch = L.Completions(prompts, torch.ones(b, p, dtype=torch.long), torch.full((b,), p), res.tokens[:, :l], None,
                          torch.arange(b), tr)
    with torch.no_grad():
        got = L.trajectory(model, batch, ObjectiveConfig(), model.config.text_config.vocab_size, None)  # [b, k l]
    assert got.shape == (b, steps * l) and len(trace) == steps
    drawn = L.counted(batch, "trajectory").view(b, steps, l)
    sc, committed = None, torch.zeros(b, l, dtype=torch.bool)
    for j in range(steps):
        with torch.no_grad():
            logits = model(input_ids=prompts, decoder_input_ids=tr.canvas[j], self_conditioning_logits=sc).logits.float()
        scaled = logits / tr.temperatures[j]
        want = F.log_softmax(scaled, -1).gather(-1, tr.tokens[j][..., None]).squeeze(-1)
        torch.testing.assert_close(got.view(b, steps, l)[:, j][drawn[:, j]], want[drawn[:, j]], rtol=1e-4, atol=1e-4)
        st = step_stats(scaled.view(b * l, -1), torch.tensor(1.0), backend="torch")
        if j < steps - 1:
            if strategy == "entropy_bound":
                assert torch.equal(drawn[:, j], entropy_bound_accept(st.entropy.view(b, l), cfg.entropy_bound))
            else:  # k = ceil(free / steps left) most confident free positions
                k = (l - committed.sum(-1) + steps - j - 1) // (steps - j)
                assert torch.equal(drawn[:, j].sum(-1), k)
                conf = st.max_prob.view(b, l).masked_fill(committed, -1.0)
                assert (conf.masked_fill(~drawn[:, j], 2.0).min(-1).values
                        >= conf.masked_fill(drawn[:, j] | committed, -1.0).max(-1).values - 1e-5).all()
            assert torch.equal(tr.canvas[j + 1][drawn[:, j]], tr.tokens[j][drawn[:, j]])
        committed |= drawn[:, j]
        sc = scaled
    last = tr.tokens[-1] if strategy == "entropy_bound" else torch.where(drawn[:, -1], tr.tokens[-1], tr.canvas[-1])
    from dgtune.sampling.config import pad_after_eos

    assert torch.equal(res.tokens[:, :l], pad_after_eos(last, tok.eos_token_id, tok.pad_token_id))
    assert drawn[:, -1].all() if strategy == "entropy_bound" else committed.all()


def test_tree_rollouts_share_their_first_steps_and_score_each_step():
    """Tree rollouts: leaves of a node share the draws before the branch step and draw their own from it on; the
    advantages of the draws before it are the node's value against the group, after it the leaf's against its node."""
    from dgtune.models.tiny import build_tiny_model
    from dgtune.rl.objectives import tree_advantages
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sampling.sampler import sample

    model, tok = build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, canvas_length=24)
    prompts = torch.randint(7, 40, (1, 9), generator=torch.Generator().manual_seed(3)).expand(4, 9)
    cfg = SamplerConfig(max_steps=2, entropy_bound=3.0, last_step="sample")
    trace = []
    with torch.no_grad():
        sample(model, prompts, cfg, None, tok.eos_token_id, tok.pad_token_id, 24, row_seeds=torch.tensor([5, 5, 6, 6]),
               trace=trace, branch=(1, torch.tensor([1, 2, 3, 4])))
    c1, last = trace[1].canvas, trace[1].tokens  # [4, l] the step-1 input canvas, the last step's draws
    assert torch.equal(c1[0], c1[1]) and torch.equal(c1[2], c1[3]) and not torch.equal(c1[0], c1[2])
    assert not torch.equal(last[0], last[1]) and not torch.equal(last[2], last[3])

    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # 2 groups of 2 nodes x 2 leaves; the 2nd is flat
    prefix, leaf = tree_advantages(r, 4, 2, normalise=False)
    torch.testing.assert_close(prefix, torch.tensor([-0.25, -0.25, 0.25, 0.25, 0, 0, 0, 0]))
    torch.testing.assert_close(leaf, torch.tensor([0.5, -0.5, 0.0, 0.0, 0, 0, 0, 0]))
    prefix_n, _ = tree_advantages(r, 4, 2)
    torch.testing.assert_close(prefix_n[:4], prefix[:4] / (r[:4].std(unbiased=False) + 1e-6))


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
@pytest.mark.parametrize("setting", [[], ["method.estimator=trajectory", "method.last_step=sample", "method.branches=2"]],
                         ids=["one_pass", "trajectory_tree"])
def test_rl_raises_a_rule_reward_deterministically(tmp_path, monkeypatch, setting):
    """From the bundled base, reward = the share of the answer's characters that are "1" (a rule the base does not
    follow: 0.11 at first): the rollouts' mean reward over the last 4 of 12 steps is well above the first 4, and a
    second run with the same seed logs the same rewards (d1's one-pass estimate; the sampler's own trajectory with
    tree rollouts)."""
    from dgtune.train import train

    fn = _reward_module(monkeypatch)
    over = [f"method.reward_fn={fn}", "trainer.max_steps=12", *setting]
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


def test_flat_groups_skipped_leave_the_loss_and_its_gradient_unchanged(tmp_path):
    """`method.skip_flat_groups`: the loss pass reads only the groups with reward variance, scaled by their share of
    the rows; loss and gradient equal those over every row (whose flat groups' terms are 0)."""
    import itertools

    from dgtune.data import splits_for
    from dgtune.models.tiny import build_tiny_model
    from dgtune.rl.method import RL as Method
    from dgtune.tasks import build_task

    cfg = compose([*BASE, *RL, "trainer.batch_size=32", "method.log_kl=false", "method.estimator=trajectory",
                   "method.last_step=sample", f"data_dir={tmp_path}"])
    task = build_task(cfg.task)
    model, tok = build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, canvas_length=task.canvas_length)
    method = Method(cfg, task, splits_for(task, cfg), model, tok, 1)
    results = []
    for skip in (True, False):
        count = itertools.count()
        # groups 0 and 2 all 1s (flat), groups 1 and 3 alternate 0 / 1
        method.rewarder = lambda row, text: (lambda i: (1.0 if (i // 8) % 2 == 0 else float(i % 2), {}))(next(count))
        method.skip_flat = skip
        ro = method._rollouts(0, torch.device("cpu"), None)
        model.zero_grad()
        out = method.module(ro)
        out["loss"].backward()
        results.append((ro, out["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ro_s, loss_s, g_s), (ro_a, loss_a, g_a) = results
    assert ro_s.batch.canvas.shape[0] == 16 and ro_a.batch.canvas.shape[0] == 32 and ro_s.flat_groups == 2
    torch.testing.assert_close(loss_s, loss_a, rtol=1e-5, atol=1e-7)
    assert len(g_s) == len(g_a) > 0
    for a, b in zip(g_s, g_a):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


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


def test_self_training_batch_is_the_sft_batch_of_the_same_answers(tmp_path):
    """`method.objective=rft` trains SFT's loss on approved completions: a completion equal to the reference answer
    gives exactly the batch `dgtune.data` builds for SFT (prompt + answer + EOS, EOS-filled canvas, template)."""
    from dgtune.data import collate_train, encode_rows, splits_for
    from dgtune.models.load import load_model
    from dgtune.rl.likelihood import Completions
    from dgtune.rl.self_training import self_training_batch
    from dgtune.tasks import build_task

    cfg = compose([*BASE, "task.template=true", f"data_dir={tmp_path}"])
    task = build_task(cfg.task)
    _, tok = load_model(cfg.model)
    rows = splits_for(task, cfg)["train"][:6]
    items = encode_rows(tok, rows, task.canvas_length, task)
    ref = collate_train(items, tok.pad_token_id)
    p = max(len(it["prompt"]) for it in items)
    prompts = torch.full((len(items), p), tok.pad_token_id)
    for i, it in enumerate(items):
        prompts[i, : len(it["prompt"])] = torch.tensor(it["prompt"])
    plen = torch.tensor([len(it["prompt"]) for it in items])
    batch = Completions(prompts, (torch.arange(p)[None] < plen[:, None]).long(), plen, ref["canvas"],
                        ref["canvas_keep"], torch.arange(len(items)))
    got = self_training_batch(batch, tok.eos_token_id, tok.pad_token_id)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_rft_trains_the_approved_rows_only_scaled_by_their_share(tmp_path):
    """rft: the loss rows are the completions whose reward reaches `method.rft_min_reward` (flat groups included),
    the loss is SFT's denoising loss of them times their share of the rows, and a step with none approved is 0."""
    import itertools

    from dgtune.data import splits_for
    from dgtune.diffusion.loss import denoising_loss
    from dgtune.models.tiny import build_tiny_model
    from dgtune.rl.method import RL as Method
    from dgtune.rl.self_training import self_training_batch
    from dgtune.tasks import build_task

    cfg = compose([*BASE, *RL, "method.objective=rft", f"data_dir={tmp_path}"])
    task = build_task(cfg.task)
    model, tok = build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, canvas_length=task.canvas_length)
    method = Method(cfg, task, splits_for(task, cfg), model, tok, 1)
    assert method.reference is None  # no KL, no reference copy
    count = itertools.count()
    method.rewarder = lambda row, text: (float(next(count) < 8), {})  # the first group, all approved (flat)
    ro = method._rollouts(0, torch.device("cpu"), None)
    assert ro.batch.canvas.shape[0] == 8 and ro.scale == 0.5 and ro.flat_groups == 2
    out = method.module(ro)
    expect = denoising_loss(model, self_training_batch(ro.batch, tok.eos_token_id, tok.pad_token_id),
                            method.obj_cfg, torch.Generator().manual_seed(ro.noise_seed), method.vocab, method.mask_id)
    torch.testing.assert_close(out["loss"], expect["loss"] * 0.5)
    method.rewarder = lambda row, text: (0.0, {})
    assert float(method.module(method._rollouts(1, torch.device("cpu"), None))["loss"]) == 0.0


def test_rft_hindsight_trains_a_missed_completion_under_the_prompt_it_answers(tmp_path):
    """rft with `method.hindsight`: rows the verifier rejects but `task.relabel` rewrites are trained under the
    rewritten prompt (right-padded, its own length), beside the approved rows; the rest are left out; the share is
    logged. A task without `relabel`, or hindsight without rft, is a config error."""
    from dgtune.data import prompt_ids, row_prompt, splits_for
    from dgtune.errors import ConfigError
    from dgtune.models.tiny import build_tiny_model
    from dgtune.rl.method import RL as Method
    from dgtune.tasks import build_task

    over = ["task=countdown_cd3", "task.n_train=64", "method.objective=rft", "method.hindsight=true"]
    cfg = compose([*BASE, *RL, *over, f"data_dir={tmp_path}"])
    task = build_task(cfg.task)
    model, tok = build_tiny_model(seed=0, hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, canvas_length=task.canvas_length)
    method = Method(cfg, task, splits_for(task, cfg), model, tok, 1)
    seen = []

    def relabel(row, text):  # every third rejected row answers the puzzle with target 1000 + its call's index
        seen.append(row)
        i = len(seen) - 1
        return None if i % 3 else {**row, "prompt": row["prompt"].replace("countdown:", f"countdown:{1000 + i}")}

    task.relabel = relabel
    verdicts = iter([0.0, 1.0] + [0.0] * 14)  # row 1 solves its own target: approved, never relabelled
    method.rewarder = lambda row, text: (next(verdicts), {})
    ro = method._rollouts(0, torch.device("cpu"), None)
    calls = [0, 3, 6, 9, 12]  # of relabel's 15 calls (rows 0, 2, 3, ..., 15): rows 0, 4, 7, 10, 13
    assert len(seen) == 15 and ro.relabelled == 5 / 16 and ro.scale == 6 / 16
    assert ro.batch.canvas.shape[0] == 6  # rows 0, 1, 4, 7, 10, 13 in order
    for k, i in zip([0, 2, 3, 4, 5], calls):
        want = prompt_ids(tok, row_prompt({**seen[i], "prompt": seen[i]["prompt"].replace("countdown:",
                                                                                           f"countdown:{1000 + i}")}))
        n = int(ro.batch.prompt_len[k])
        assert ro.batch.input_ids[k, :n].tolist() == want and n > len(prompt_ids(tok, row_prompt(seen[i])))
        assert not ro.batch.attention_mask[k, n:].any()
    assert float(method.module(ro)["relabelled"]) == 5 / 16
    with pytest.raises(ConfigError, match="hindsight.*relabel.*'sudoku.*none"):
        Method(compose([*BASE, *RL, "method.objective=rft", "method.hindsight=true", f"data_dir={tmp_path}"]),
               build_task(compose(BASE).task), {"train": []}, model, tok, 1)
    with pytest.raises(ConfigError, match="hindsight=true takes method.objective=rft.*'grpo'"):
        Method(compose([*BASE, *RL, *over[:2], "method.hindsight=true", f"data_dir={tmp_path}"]), task,
               {"train": []}, model, tok, 1)


@pytest.mark.trains
@pytest.mark.parametrize("family", [["model=llada_tiny", "objective=llada", "sampler=topk_confidence_mask"],
                                    ["model=dream_tiny", "objective=dream", "sampler=dream_entropy"],
                                    ["model=llada2_tiny", "objective=llada2", "sampler=block_refine"],
                                    ["model=sdar_tiny", "objective=sdar", "sampler=block_refine"]],
                         ids=["llada", "dream", "llada2", "sdar"])  # the rollouts commit sampled tokens: argmax groups are flat
def test_rl_objectives_run_on_the_built_families(tmp_path, monkeypatch, family):
    """GRPO with d1's one-pass estimate (whose corruption is [MASK] for these families' objectives), GRPO with the
    sampler's own trajectory (the block sampler's trace for LLaDA2 and SDAR) and rft each take 3 steps on the tiny
    LLaDA, Dream, LLaDA2 and SDAR (model sizes shrunk): finite losses, the rollouts' rewards logged, the adapter
    moved."""
    from safetensors.torch import load_file

    from dgtune.train import train

    fn = _reward_module(monkeypatch)
    small = ["model.sizes.n_layers=2" if "llada_tiny" in family[0] else "model.sizes.num_hidden_layers=2"]
    family = [*family, "sampler.commit=sample"]
    runs = [("one_pass", []), ("trajectory", ["method.estimator=trajectory"]),
            ("rft", ["method.objective=rft", "method.rft_min_reward=0.01", "method.group_size=1"])]
    for name, extra in runs:
        run = tmp_path / name
        train(_rl_cfg(tmp_path, name, *family, *small, f"method.reward_fn={fn}", "trainer.max_steps=3", *extra))
        metrics = _metrics(run)
        assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics), name
        assert all("train/reward" in m for m in metrics)
        adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
        assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k), name


def test_approved_rows_are_this_process_slice_of_every_process_approvals():
    """rft's loss batch on one process: the approved rows in order and the slice of them that is the process'
    own; with nothing approved, one row with no slice (its loss is scaled by 0)."""
    from dgtune.rl.method import approved_rows

    tok = types.SimpleNamespace(pad_token_id=0)
    batch = _completions(tok, n=3)
    sub, rows, n = approved_rows(batch, torch.tensor([True, False, True]), None, 0)
    assert torch.equal(sub.canvas, batch.canvas[[0, 2]]) and rows == slice(0, 2) and n == 2
    sub, rows, n = approved_rows(batch, torch.tensor([False, False, False]), None, 0)
    assert sub.canvas.shape[0] == 1 and rows is None and n == 0


@pytest.mark.trains
def test_a_step_with_nothing_approved_leaves_the_weights(tmp_path, monkeypatch):
    """rft whose verifier approves only the first step's rollouts: the steps after it have no training signal (zero
    gradient) and take no optimizer step, so 3 steps end on exactly the weights of 1 step (before, Adam re-applied
    the first step's momentum on every empty step and moved the weights on). The empty steps are logged."""
    from safetensors.torch import load_file

    from dgtune.train import train

    mod = types.ModuleType("dgtune_test_first_step")
    calls = {"n": 0}

    def first_step_only(row, output):
        calls["n"] += 1
        return 1.0 if calls["n"] <= 16 else 0.0  # the first step's 16 rollouts

    mod.first_step_only = first_step_only
    monkeypatch.setitem(sys.modules, "dgtune_test_first_step", mod)
    over = ["method.objective=rft", "method.group_size=1", "method.rft_min_reward=0.5",
            "method.reward_fn=dgtune_test_first_step:first_step_only", "trainer.warmup_steps=0"]
    weights = {}
    for steps in (1, 3):
        calls["n"] = 0
        train(_rl_cfg(tmp_path, f"s{steps}", *over, f"trainer.max_steps={steps}"))
        weights[steps] = load_file(str(tmp_path / f"s{steps}" / "final" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in weights[1].items() if "lora_B" in k)  # step 1 learned
    assert weights[1].keys() == weights[3].keys()
    for k in weights[1]:
        assert torch.equal(weights[1][k], weights[3][k]), k
    logged = _metrics(tmp_path / "s3")
    assert [m.get("train/skipped_empty", 0.0) for m in logged] == [0.0, 1.0, 1.0]
