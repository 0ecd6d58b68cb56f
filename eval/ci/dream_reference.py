"""Plain transcriptions of Dream's published code, the references dgtune's Dream family is checked against
(tests/test_dream.py on the tiny Dream; eval/ci/gpu_check_dream.py on the real weights).

- `dream_sft_loss`: DreamLM/DreamOn `src/trainer/fsdp_sft_expand_trainer.py`, `_compute_loss_and_backward` (the
  plain branch): logits shifted right by one (`torch.cat([logits[:, 0:1], logits[:, :-1]], dim=1)`), cross-entropy
  on the masked positions (`loss_mask`), weight 1 / t (`time_reweighting == "original"`), summed and divided by the
  number of masked positions (`valid_token_this_rank`); the masking of `sft_expand_dataset.py` without its
  expand/delete tokens: t ~ U(0, 1), each answer token masked where a uniform draw is below t.
- `dream_generate`: `generation_utils.py` `DreamGenerationMixin._sample` (as the `dllm` library ships it in
  `dllm/pipelines/dream/models/`) for alg "entropy" / "maskgit_plus" / "topk_margin" at temperature 0, top_p and
  top_k off, alg_temp 0, eps 1e-3, one row and no padding (attention "full").
"""

import torch
import torch.nn.functional as F


def dream_sft_loss(model, prompts, answers, t, u, mask_id):
    """DreamOn's loss, transcribed per row (each row its own prompt length, no padding): answer positions with
    u < t masked, shifted logits, CE x 1 / t over the masked positions, summed over the batch / their count.
    t [b] and u [b, l] are the draws."""
    total, count = 0.0, 0
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        input_ids = torch.cat([prompt, answer])[None]  # [1, p + l]
        loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        loss_mask[0, prompt.shape[0]:] = u[i] < t[i]
        noisy = torch.where(loss_mask, mask_id, input_ids)
        logits = model(input_ids=noisy, attention_mask="full").logits
        shift_logits = torch.cat([logits[:, 0:1], logits[:, :-1]], dim=1)
        loss = F.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), input_ids.view(-1), reduction="none")
        loss = loss.masked_fill(~loss_mask.view(-1), 0)
        weight = 1 / t[i].float()  # time_reweighting "original"
        total = total + (loss * weight).sum()
        count += int(loss_mask.sum())
    return total / count


def _sample_tokens(logits, margin_confidence=False, neg_entropy=False):
    """generation_utils.py `sample_tokens` at temperature 0 (no top_p / top_k): argmax and its confidence."""
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_generate(model, prompt, steps, gen_length, mask_id, alg="entropy", eps=1e-3):
    """`_sample` transcribed (module docstring); returns the generated tokens [1, gen_length]."""
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x, "full", None).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        confidence, x0 = _sample_tokens(mask_logits, margin_confidence=alg == "topk_margin",
                                        neg_entropy=alg == "entropy")
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, device=x.device, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if number_transfer_tokens > 0:
            _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
            x_ = torch.zeros_like(x, device=x.device, dtype=torch.long) + mask_id
            x_[mask_index] = x0.clone()
            row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
            x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x[:, prompt.shape[1]:]
