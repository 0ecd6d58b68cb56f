"""Rewards to advantages, and the policy losses of `method=rl` (`method.objective`), as pure functions on tensors.

- `group_advantages`: each completion's reward minus its group's mean (the G completions of one prompt), divided
  by the group's standard deviation when `normalise` (GRPO; Dr. GRPO leaves it out). A group whose rewards are all
  equal gives zero advantages: no signal, counted and logged.
- `grpo_loss` (DeepSeekMath's GRPO as d1's diffu-GRPO applies it to diffusion LMs): per free canvas position,
  ratio r = exp(logp - logp_old), the clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps) A), plus beta times the
  k3 estimate of KL(pi || pi_ref), exp(ref - logp) - (ref - logp) - 1; averaged over each completion's free
  positions, then over completions. With one update per rollout batch (`method.mu=1`) logp_old = logp (detached),
  r = 1 and the surrogate's gradient is the policy gradient A grad logp.
- `tree_advantages`: per-step advantages of tree rollouts (nodes that share their first steps, then branch).
- `wd1_loss` (wd1, arXiv 2507.08838: no ratio, no old policy): the group's completions weighted by
  w+ = softmax(psi A) over the group (pulled up) and w- = softmax(-psi A) (pushed down), loss
  -sum_i (w+_i - w-_i) L_i per group, averaged over groups, where L_i is completion i's sequence estimate.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalise: bool = True,
                     eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """(advantages [n], groups with no reward variance) for rewards [n] in consecutive groups of `group_size`."""
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [groups, G]
    centred = r - r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, unbiased=False)  # [groups, 1]
    flat = std.squeeze(-1) < eps
    adv = centred / (std + eps) if normalise else centred
    adv = torch.where(flat[:, None], torch.zeros_like(adv), adv)
    return adv.view(n), int(flat.sum())


def tree_advantages(rewards: torch.Tensor, group_size: int, branches: int, normalise: bool = True,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-level advantages of tree rollouts (d-TreeRPO's idea at one branching step): each group of `group_size`
    completions of a prompt is group_size / branches nodes that shared the steps before the branch, with `branches`
    leaves each. Returns (prefix [n], leaf [n]): a node's value (the mean of its leaves' rewards) minus the group's
    mean, for the draws before the branch, and a leaf's reward minus its node's value, for the draws from the branch
    on; both divided by the group's reward std when `normalise`; 0 in groups whose rewards are all equal."""
    n = rewards.shape[0]
    if n % group_size or group_size % branches:
        raise ValueError(f"{n} rewards do not split into groups of {group_size} of nodes with {branches} leaves")
    r = rewards.float().view(-1, group_size // branches, branches)  # [groups, nodes, leaves]
    node = r.mean(-1, keepdim=True)  # [groups, nodes, 1]
    mean = r.mean((1, 2), keepdim=True)
    std = r.flatten(1).std(-1, unbiased=False).view(-1, 1, 1)  # [groups, 1, 1]
    scale = 1.0 / (std + eps) if normalise else torch.ones_like(std)
    scale = torch.where(std < eps, torch.zeros_like(std), scale)  # flat groups: no signal
    prefix = ((node - mean) * scale).expand_as(r)
    return prefix.reshape(n), ((r - node) * scale).reshape(n)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [b, l] over mask [b, l] per row [b]."""
    m = mask.float()
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-position k3 estimate of KL(pi || pi_ref), exp(ref - logp) - (ref - logp) - 1 >= 0 ([b, l] from [b, l])."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              free: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """GRPO's clipped surrogate plus beta x KL (module docstring). logp / old_logp / ref_logp [b, l] per-position
    estimates (old and ref without gradient), adv [b] (or [b, l]: one per position, as tree rollouts give), free
    [b, l]. Returns (loss, stats: clip_frac, kl, ratio)."""
    ratio = torch.exp(logp - old_logp)  # [b, l]
    a = adv if adv.dim() == 2 else adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # [b, l]
    per_pos = -surrogate
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)  # [b, l]
        if beta > 0:
            per_pos = per_pos + beta * kl
    loss = masked_mean(per_pos, free).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps) & free
        stats = {"clip_frac": clipped.float().sum() / free.float().sum().clamp(min=1.0),
                 "ratio": masked_mean(ratio, free).mean()}
        if kl is not None:
            stats["kl"] = masked_mean(kl, free).mean()
    return loss, stats


def wd1_loss(seq_logp: torch.Tensor, adv: torch.Tensor, group_size: int, psi: float = 1.0) -> torch.Tensor:
    """wd1's weighted likelihood (module docstring): seq_logp [n] sequence estimates, adv [n] in groups of
    `group_size`. Groups with no reward variance (all advantages 0) weigh their completions equally up and down:
    no gradient."""
    a = adv.view(-1, group_size)  # [groups, G]
    w = torch.softmax(psi * a, -1) - torch.softmax(-psi * a, -1)  # [groups, G]
    return -(w.detach() * seq_logp.view(-1, group_size)).sum(-1).mean()
