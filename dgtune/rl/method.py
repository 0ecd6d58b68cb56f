"""`method=rl`: reinforcement learning from the task's verifier after SFT, at the step count you will sample with.

One optimizer step, read top to bottom (`RL.micro_step`):

1. **Rollouts** (every `method.mu` steps, a new block): `prompts_per_step` = global batch / `group_size` training
   prompts (a pure function of seed and block), each repeated `group_size` times; each process draws its own rows'
   completions with dgtune's fast sampler (`sampler.*`, the eval sampler with its templates and guides) at
   `method.rollout_steps` denoising steps, from per-row seeds (seed, block, row): the same completions on 1 or N
   processes, and after a resume.
2. **Rewards** from the task's verifier (`dgtune.rl.rewards`), **advantages** per group (`group_advantages`).
3. For `mu` > 1 the old policy's estimates (no gradient) at the block's start; with `method.beta` > 0 (or
   `method.log_kl`) the reference policy's (the `init_from` weights: the adapter's initial values swapped in, no
   second copy of the model).
4. **The loss** (`PolicyLoss`, the module accelerate wraps, so DDP sees the model call): the estimator's
   per-position log-likelihoods of the completions under the current policy (`dgtune.rl.likelihood`, with gradient),
   then GRPO's clipped surrogate + KL or wd1's weighted likelihood (`dgtune.rl.objectives`).

The loop, checkpoints, quick evals / learning curve (at `eval.quick_steps`), deadline and the final report are the
training loop's (`dgtune.train`, `dgtune.hooks`), shared with SFT. Blocks are whole: with `mu` > 1 checkpoints and
the deadline fall on block boundaries, so a resumed run redraws exactly the rollouts an uninterrupted one used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from omegaconf import OmegaConf

from dgtune.data import batch_indices, prompt_ids, row_prompt
from dgtune.diffusion.loss import denoising_loss
from dgtune.diffusion.model_calls import block_diffusion, vocab_size
from dgtune.diffusion.objective import ObjectiveConfig
from dgtune.errors import ConfigError
from dgtune.eval.runner import group_by_prompt_length
from dgtune.methods import register_method
from dgtune.rl.likelihood import ESTIMATORS, Completions, Trace, counted, sequence_logp
from dgtune.rl.objectives import group_advantages, grpo_loss, k3_kl, masked_mean, tree_advantages, wd1_loss
from dgtune.rl.rewards import Rewarder
from dgtune.rl.self_training import self_training_batch
from dgtune.sampling.config import pad_after_eos, sampler_config
from dgtune.sampling.sampler import sample

OBJECTIVES = ("grpo", "wd1", "rft")


@dataclass
class Rollouts:
    """One block's completions of this process' rows and what the loss needs of them."""

    batch: Completions  # the rows the loss reads (`method.skip_flat_groups`: those of groups with reward variance)
    rewards: torch.Tensor  # [b] every row's
    advantages: torch.Tensor  # [b'] the loss rows' ([b', n] per step and position with tree rollouts)
    scale: float  # loss rows / all rows: the loss is the mean over all b rows, flat groups' terms being 0
    solved: torch.Tensor  # [b]
    flat_groups: int  # groups of this process with no reward variance
    old_logp: torch.Tensor | None  # [b', n] (mu > 1)
    ref_logp: torch.Tensor | None  # [b', n] (beta > 0 or log_kl)
    est_var: float | None  # mean over rows of the estimator's variance across repeated draws (when measured)
    tokens: int
    noise_seed: int = 0  # rft: the seed of the denoising loss' draws (seed, block)
    relabelled: float = 0.0  # rft with hindsight: share of the rows approved as answers to their own value
    loss_rows: slice | None = None  # rft: this process' rows of `batch`, the approved rows of every process


class PolicyLoss(torch.nn.Module):
    """The RL loss of a block's rollouts as a module around the model (what accelerate wraps)."""

    def __init__(self, model, method: "RL"):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, ro: Rollouts) -> dict[str, torch.Tensor]:
        """Loss and statistics of the rollouts `ro` under the current policy."""
        m = self.method
        device = ro.batch.canvas.device
        stats = {}
        if m.objective == "rft":  # the SFT loss of the approved completions (dgtune.rl.self_training)
            sft = denoising_loss(self.model, self_training_batch(ro.batch, m.tokenizer.eos_token_id,
                                                                 m.tokenizer.pad_token_id),
                                 m.obj_cfg, torch.Generator(device=device).manual_seed(ro.noise_seed), m.vocab,
                                 m.mask_id, rows=ro.loss_rows, processes=m.world)
            loss = sft["loss"]
            stats = {"diffusion_loss": sft["diffusion_loss"], "approved": torch.tensor(ro.scale, device=device)}
            if m.hindsight:
                stats["relabelled"] = torch.tensor(ro.relabelled, device=device)
        else:
            loss, stats = self._policy_loss(ro)
        out = {"loss": loss * ro.scale, "reward": ro.rewards.mean().to(device), "reward_std": ro.rewards.std().to(device),
               "rollout_solved": ro.solved.mean().to(device),
               "flat_groups": torch.tensor(float(ro.flat_groups), device=device), **stats}
        if ro.est_var is not None:
            out["estimator_var"] = torch.tensor(ro.est_var, device=device)
        return out

    def _policy_loss(self, ro: Rollouts) -> tuple[torch.Tensor, dict]:
        """(loss, statistics) of GRPO or wd1 on the estimator's log-likelihoods."""
        m = self.method
        logp = m.estimate(self.model, ro.batch)  # [b, n] with gradient
        free = counted(ro.batch, m.estimator)  # [b, n]
        if m.objective == "grpo":
            old = ro.old_logp if ro.old_logp is not None else logp.detach()
            loss, stats = grpo_loss(logp, old, ro.ref_logp, ro.advantages, free, m.clip_eps, m.beta)
        else:
            loss = wd1_loss(sequence_logp(logp, free), ro.advantages, m.group_size, m.psi)
            stats = {}
            if ro.ref_logp is not None:  # reduced as grpo_loss reduces it
                stats["kl"] = masked_mean(k3_kl(logp.detach(), ro.ref_logp), free).mean()
        return loss, stats


@register_method("rl")
class RL:
    """Reinforcement learning from the task's verifier (module docstring); settings in `configs/method/rl.yaml`."""

    def __init__(self, cfg, task, splits, model, tokenizer, world: int):
        m = cfg.method
        self.cfg, self.task, self.tokenizer, self.model = cfg, task, tokenizer, model
        self.group_size, self.mu = int(m.group_size), int(m.mu)
        self.objective, self.estimator = m.objective, m.estimator
        self.clip_eps, self.beta, self.psi = float(m.clip_eps), float(m.beta), float(m.psi)
        self.draws, self.prompt_noise = int(m.draws), float(m.prompt_noise)
        # a group whose rewards are all equal has zero advantages: with no KL term its rows add nothing to the loss
        self.skip_flat = bool(m.get("skip_flat_groups", False)) and self.beta == 0
        self.rft = self.objective == "rft"  # self-training on approved completions: no estimator, ratio or KL
        self.rft_min = float(m.get("rft_min_reward", 1.0))
        # hindsight: a completion that misses its target but is a verified answer to another (`task.relabel`)
        # trains as that answer, its prompt rewritten (Countdown: a legal expression answers its own value)
        self.hindsight = bool(m.get("hindsight", False))
        if self.hindsight and not (self.rft and callable(getattr(task, "relabel", None))):
            raise ConfigError(f"method.hindsight=true takes method.objective=rft (got {self.objective!r}) and a task "
                              f"that rewrites a row for an answer it did not ask for (`relabel(row, output)`; "
                              f"task {getattr(task, 'name', task)!r} has {'one' if hasattr(task, 'relabel') else 'none'})")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"method.objective={self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"method.estimator={self.estimator!r}: expected one of {', '.join(ESTIMATORS)}")
        if cfg.trainer.batch_size % self.group_size:
            raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must hold whole groups of "
                              f"method.group_size={self.group_size} (each process computes its groups' advantages)")
        if cfg.trainer.grad_accum != 1:
            raise ConfigError("method=rl takes trainer.grad_accum=1 (a step's completions are one rollout batch)")
        if self.mu < 1 or cfg.trainer.ckpt_every % self.mu:
            raise ConfigError(f"trainer.ckpt_every={cfg.trainer.ckpt_every} must be a multiple of method.mu={self.mu} "
                              "(checkpoints fall on rollout-block boundaries, so a resume redraws the same rollouts)")
        self.steps_per_block = self.mu
        self.world = world
        self.prompts = splits["train"]
        self.global_batch = cfg.trainer.batch_size * world
        self.rewarder = Rewarder(task, OmegaConf.to_container(m.reward), m.get("reward_fn"))
        self.obj_cfg = ObjectiveConfig(**OmegaConf.to_container(cfg.objective, resolve=True))
        self.vocab, self.mask_id = vocab_size(model), tokenizer.mask_token_id
        scfg = sampler_config(cfg, tokenizer)
        # older runs' configs lack last_step: their rollouts output the argmax canvas
        self.sampler = replace(scfg, max_steps=int(m.rollout_steps), last_step=m.get("last_step", "argmax"))
        self.guided = bool(m.get("guided"))
        self.branches = int(m.get("branches", 1))  # leaves per node of a tree rollout (1: independent rollouts)
        self.branch_step = int(m.get("branch_step", -1)) % self.sampler.max_steps  # the step whose draws branch
        if self.rft and (self.mu != 1 or self.beta > 0 or int(m.get("branches", 1)) > 1):
            raise ConfigError("method.objective=rft takes method.mu=1, method.beta=0 and method.branches=1 (it "
                              "trains the denoising loss on the approved completions: no old or reference policy)")
        if self.estimator == "trajectory" and not self.rft:
            self._check_trajectory()
        if self.branches > 1 and (self.estimator != "trajectory" or self.objective != "grpo"
                                  or self.group_size % self.branches):
            raise ConfigError(f"method.branches={self.branches} (tree rollouts) takes method.estimator=trajectory, "
                              f"method.objective=grpo and a method.group_size={self.group_size} that it divides")
        self.variance_every = int(m.variance_every)
        self.log_kl = (bool(m.log_kl) or self.beta > 0) and not self.rft
        trainable = [p for p in model.parameters() if p.requires_grad]
        # the reference policy: the init weights of what trains (the adapter; a full fine-tune copies its trainables)
        self.trainable, self.reference = trainable, [p.detach().clone() for p in trainable] if self.log_kl else None
        self.module = PolicyLoss(model, self)
        self.block: tuple[int, Rollouts] | None = None

    def _check_trajectory(self) -> None:
        """The trajectory estimator replays the sampler's draws: refuse the settings whose draws it cannot replay."""
        sc = self.sampler
        if self.guided:
            raise ConfigError("method.estimator=trajectory does not take method.guided=true (the guide masks the "
                              "logits the draws came from; the replay would score other distributions)")
        if sc.max_canvases != 1:
            raise ConfigError(f"method.estimator=trajectory: sampler.max_canvases={sc.max_canvases}, the trace covers "
                              "one canvas")
        committing = sc.strategy != "entropy_bound"
        if (committing and sc.commit != "sample") or (not committing and sc.last_step != "sample" and sc.max_steps == 1):
            raise ConfigError("method.estimator=trajectory: the rollouts draw no token at random (sampler.commit="
                              f"{sc.commit}, method.last_step={sc.last_step}, {sc.max_steps} step(s)), so there is "
                              "no likelihood to score: use sampler.commit=sample / method.last_step=sample")

    def describe(self) -> str:
        """What it trains on, for the start-up line."""
        how = self.objective if self.rft else f"{self.objective}/{self.estimator}"  # rft reads no estimator
        return (f"rl={how} prompts={len(self.prompts)} group={self.group_size} "
                f"rollout_steps={self.sampler.max_steps}")

    def estimate(self, model, batch: Completions, seed_offset: int = 0) -> torch.Tensor:
        """The configured estimator's per-position log-likelihoods [b, l] (draws from the rows' seeds), computed in
        the weights' dtype with autocast off: the log-ratios and KL of nearby policies are differences of small
        numbers, and bf16 autocast rounded a young adapter's whole effect away (estimates with and without it
        were equal to the bit on the tiny model)."""
        if seed_offset:
            batch = replace(batch, seeds=batch.seeds + seed_offset)
        with torch.autocast(batch.canvas.device.type, enabled=False):
            return ESTIMATORS[self.estimator](model, batch, self.obj_cfg, self.vocab, self.mask_id, self.draws,
                                              self.prompt_noise)

    @contextlib.contextmanager
    def reference_weights(self):
        """The reference policy's weights in place of the trainable ones (restored on exit); no gradient."""
        saved = [p.detach().clone() for p in self.trainable]
        with torch.no_grad():
            for p, r in zip(self.trainable, self.reference):
                p.copy_(r)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.trainable, saved):
                    p.copy_(s)

    def _rollouts(self, block: int, device, rows: slice | None, seed_offset: int = 0) -> Rollouts:
        """Draw, grade and score this process' rows of block `block` (module docstring, steps 1-3); `seed_offset`
        shifts the rows' sampler seeds (fresh draws of the same prompts, for `eval/analysis/rl_direction.py`)."""
        cfg, tok, task = self.cfg, self.tokenizer, self.task
        P = self.global_batch // self.group_size
        picked = batch_indices(len(self.prompts), P, block, cfg.seed)  # [P] prompt indices of this block
        global_rows = [self.prompts[i] for i in picked for _ in range(self.group_size)]  # [P G]
        lo, hi = (rows.start, rows.stop) if rows is not None else (0, len(global_rows))
        mine = global_rows[lo:hi]
        row = torch.arange(lo, hi, dtype=torch.long)  # global row indices
        base = cfg.seed * 1_000_003 + block * 100_003 + 7 + seed_offset
        seeds = row - row % self.branches + base  # tree rollouts: a node's leaves share its seed ...
        branch_seeds = row + base + 1_000_000_007  # ... until the branch step, then draw from their own
        groups = group_by_prompt_length(tok, mine)  # [(row indices, prompt ids [n, p])], equal lengths per call
        eos, pad = tok.eos_token_id, tok.pad_token_id
        template = task.template_tensor(tok, mine) if getattr(task, "use_template", False) else None  # [b, l]
        guided = self.guided
        canvas = torch.empty(len(mine), task.canvas_length, dtype=torch.long)
        parts = [] if self.estimator == "trajectory" and not self.rft else None  # (row indices, the sampler's steps) per call
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for idx, prompts in groups:
                steps = None if parts is None else []
                res = sample(self.model, prompts.to(device), self.sampler,
                             torch.Generator(device=device).manual_seed(block), eos, pad, task.canvas_length,
                             row_seeds=seeds[idx].to(device),
                             template=None if template is None else template[idx].to(device),
                             guide=task.make_guide(tok, [mine[i] for i in idx]) if guided else None, trace=steps,
                             branch=(self.branch_step, branch_seeds[idx].to(device)) if self.branches > 1 else None)
                canvas[idx] = res.tokens[:, : task.canvas_length].cpu()
                if parts is not None:
                    parts.append((torch.as_tensor(idx, dtype=torch.long), steps))
        texts = tok.batch_decode(canvas, skip_special_tokens=True)
        scored = [self.rewarder(r, t) for r, t in zip(mine, texts)]
        rewards = torch.tensor([s for s, _ in scored], dtype=torch.float32)
        solved = torch.tensor([float(g.get("solved") or 0.0) for _, g in scored])
        adv, flat = group_advantages(rewards, self.group_size, bool(cfg.method.normalise_advantages))
        if self.branches > 1:  # per step: the draws before the branch by their node's value, after it by the leaf's
            prefix, leaf = tree_advantages(rewards, self.group_size, self.branches,
                                           bool(cfg.method.normalise_advantages))
            k = max(len(steps) for _, steps in parts)  # the trace's steps (as `Trace.from_steps` counts them)
            before = (torch.arange(k) < self.branch_step).repeat_interleave(task.canvas_length)  # [k l]
            adv = torch.where(before[None, :], prefix[:, None], leaf[:, None])  # [b, k l]
        if not bool(cfg.method.get("negatives", True)):  # only the better completions are pulled up
            adv = adv.clamp(min=0.0)
        live = torch.arange(len(mine))  # the rows the loss reads
        approve = rewards >= self.rft_min  # [b] rft: the completions it trains on
        relabelled = [None] * len(mine)  # [b] hindsight: the row each missed completion answers (None: none)
        if self.hindsight:
            relabelled = [None if ok else task.relabel(r, t) for ok, r, t in zip(approve.tolist(), mine, texts)]
            approve = approve | torch.tensor([r is not None for r in relabelled], dtype=torch.bool)
        if self.rft:  # the approved completions, flat groups included (gathered from every process below)
            live = approve.nonzero().squeeze(1)
        elif self.skip_flat:
            varied = rewards.view(-1, self.group_size).std(-1, unbiased=False) >= 1e-6  # as group_advantages
            live = varied.repeat_interleave(self.group_size).nonzero().squeeze(1)
        scale = live.numel() / len(mine)
        if live.numel() == 0:  # no signal in this process' rows: one group with weight 0 (every process runs the model)
            live = torch.arange(self.group_size)
        canvas = pad_after_eos(canvas, eos, eos)  # the SFT canvas form: EOS-filled after the first EOS
        rewritten = {i: prompt_ids(tok, row_prompt(r)) for i, r in enumerate(relabelled) if r is not None}
        s = max([prompts.shape[1] for _, prompts in groups] + [len(ids) for ids in rewritten.values()])
        input_ids = torch.full((len(mine), s), pad, dtype=torch.long)  # right-padded prompts
        attention = torch.zeros(len(mine), s, dtype=torch.long)
        for idx, prompts in groups:
            input_ids[idx, : prompts.shape[1]], attention[idx, : prompts.shape[1]] = prompts, 1
        for i, ids in rewritten.items():  # hindsight: the prompt the completion answers
            input_ids[i], attention[i] = pad, 0
            input_ids[i, : len(ids)], attention[i, : len(ids)] = torch.tensor(ids), 1
            if template is not None:
                template[i] = task.template_tensor(tok, [relabelled[i]])[0]
        batch = Completions(input_ids.to(device), attention.to(device), attention.sum(-1).to(device),
                            canvas.to(device), None if template is None else (template >= 0).to(device),
                            seeds.to(device), None if parts is None else
                            Trace.from_steps(parts, len(mine), task.canvas_length, self.sampler,
                                             self.sampler.mask_token_id if self.sampler.noise == "mask"
                                             and not block_diffusion(self.model) else None  # it draws [MASK] too
                                             ).to(device))
        loss_rows = None
        if self.rft:  # every process' approved rows, this process' slice of them (as SFT's rows of a global batch)
            batch, loss_rows, approved = approved_rows(batch, approve.to(device), rows, pad)
            # the loss of the slice is its share of the approved rows' loss (`denoising_loss`); scaled by the
            # approved share of the step's rows, so that 0 approvals move nothing and N processes equal one
            scale = approved / self.global_batch if bool(approve.any()) else 0.0
        else:
            batch = batch.rows(live.to(device))  # [b'] the rows the loss reads
        old = ref = var = None
        with torch.no_grad():
            if self.mu > 1:
                old = self.estimate(self.model, batch)
            if self.log_kl:
                with self.reference_weights():
                    ref = self.estimate(self.model, batch)
            if (self.variance_every and (block + 1) % self.variance_every == 0  # logged with the step's record
                    and self.estimator != "trajectory" and not self.rft):  # (trajectory draws nothing: variance 0)
                reps = torch.stack([sequence_logp(self.estimate(self.model, batch, 1_000_000 * (j + 1)), batch.free)
                                    for j in range(3)])  # [3, b]
                var = float(reps.var(0).mean())
        if was_training:
            self.model.train()
        return Rollouts(batch, rewards.to(device), adv[live].to(device), scale, solved.to(device), flat, old, ref, var,
                        int(attention.sum()) + canvas.numel(), noise_seed=base * 7, loss_rows=loss_rows,
                        relabelled=len(rewritten) / len(mine))

    def micro_step(self, module, micro_step: int, device, rows: slice | None) -> tuple[dict, int]:
        """(loss dict of this process' rows, tokens) for optimizer step `micro_step` (grad_accum is 1)."""
        block = micro_step // self.mu
        if self.block is None or self.block[0] != block:
            self.block = (block, self._rollouts(block, device, rows))
        ro = self.block[1]
        return module(ro), ro.tokens


def gather_rows(x: torch.Tensor, fill) -> torch.Tensor:
    """x [b_p, ...] of every process (equal b_p), concatenated in rank order; a 2-D x is right-padded with `fill` to
    the widest process' width first (bool tensors travel as uint8: gloo has no bool)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    was_bool = x.dtype == torch.bool
    x = x.to(torch.uint8) if was_bool else x
    if x.dim() == 2:
        width = torch.tensor([x.shape[1]], device=x.device)
        widths = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width)
        x = torch.nn.functional.pad(x, (0, int(max(widths)) - x.shape[1]), value=fill)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    out = torch.cat(parts)
    return out.bool() if was_bool else out


def approved_rows(batch: Completions, approved: torch.Tensor, rows: slice | None,
                  pad_id: int) -> tuple[Completions, slice | None, int]:
    """rft's loss batch: the completions of every process that are `approved` ([b] bool), in global row order
    (gathered when `rows`, this process' slice of the global rows, is set), and the slice of them that are this
    process' own, and the number approved in all. The denoising loss draws its noise for the whole approved batch
    and takes this slice, so N processes see the draws of one process with all the rows
    (`dgtune.diffusion.loss.denoising_loss`'s `rows`). A process with no approved row of its own gets one row of
    another's (its loss is scaled by 0); with none approved anywhere, its first row (the same)."""
    lo, hi = (0, batch.canvas.shape[0]) if rows is None else (rows.start, rows.stop)
    if rows is not None:
        fills = {"input_ids": pad_id, "attention_mask": 0}
        batch = Completions(*(None if x is None else gather_rows(x, fills.get(name, 0)) for name, x in
                              (("input_ids", batch.input_ids), ("attention_mask", batch.attention_mask),
                               ("prompt_len", batch.prompt_len), ("canvas", batch.canvas), ("keep", batch.keep),
                               ("seeds", batch.seeds))))
        approved = gather_rows(approved, 0)
    ok = approved.nonzero().squeeze(1)  # [n] global indices of the approved rows
    if ok.numel() == 0:
        return batch.rows(torch.arange(lo, lo + 1, device=ok.device)), None, 0
    start, end = int((ok < lo).sum()), int((ok < hi).sum())
    if start == end:  # none of this process' own: one row of another's, weight 0
        start = min(start, ok.numel() - 1)
        end = start + 1
    return batch.rows(ok), slice(start, end), int(ok.numel())
