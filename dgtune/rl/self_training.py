"""`method.objective=rft`: reward-filtered self-training (rejection-sampling fine-tuning) on the verifier's approvals.

The simplest way to learn from a verifier (RAFT, arXiv 2304.06767; ReST-EM, arXiv 2312.06585; STaR): draw G
completions per prompt with the policy, keep those whose reward reaches `method.rft_min_reward`, and train on them
with the method's own supervised objective, here the denoising loss of SFT (`dgtune.diffusion.loss`, the same noise
law, self-conditioning and AR co-loss). It needs no likelihood estimate (the loss is the ELBO-style bound the model
was trained with) and no reference answers: only what the verifier approves.

The loss is the mean over all the step's rollout rows with the rejected rows' terms 0 (`Rollouts.scale` = approved
rows / rows, over every process): a step where the policy solves little moves the weights little. With
`method.hindsight` a missed completion that `task.relabel` calls an answer to another row is approved too, trained
under that row's prompt. Unlike GRPO it also
trains on groups that are all solved (no advantage, but confidence, which the entropy-bound sampler turns into
more tokens committed per step). Its noise draws are seeded by (seed, block) and made for the approved rows of
every process (gathered, `dgtune.rl.method.approved_rows`), each process training its own slice of them: a resumed
run redraws them exactly, and N processes draw what one process with all the rows draws.
"""

from __future__ import annotations

import torch

from dgtune.rl.likelihood import Completions


def self_training_batch(batch: Completions, eos_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The SFT batch (`dgtune.data.collate_train`'s form) of completions: input_ids = prompt + response up to and
    including its first EOS, right-padded with `pad_id`; attention_mask; prompt_len; canvas (EOS-filled, as
    given) and canvas_keep (the template, when there is one)."""
    b, l = batch.canvas.shape
    is_eos = batch.canvas == eos_id  # [b, l]
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((b,), l - 1, device=is_eos.device))
    resp_len = first + 1  # [b] response + its EOS (a canvas with no EOS: all of it)
    total = batch.prompt_len + resp_len  # [b]
    s = int(total.max())
    input_ids = torch.full((b, s), pad_id, dtype=torch.long, device=batch.canvas.device)
    for i in range(b):
        p, r = int(batch.prompt_len[i]), int(resp_len[i])
        input_ids[i, :p] = batch.input_ids[i, :p]
        input_ids[i, p: p + r] = batch.canvas[i, :r]
    cols = torch.arange(s, device=input_ids.device)[None, :]
    out = {"input_ids": input_ids, "attention_mask": (cols < total[:, None]).long(), "prompt_len": batch.prompt_len,
           "canvas": batch.canvas}
    if batch.keep is not None:
        out["canvas_keep"] = batch.keep
    return out
