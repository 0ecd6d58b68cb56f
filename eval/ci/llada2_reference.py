"""Plain transcriptions of LLaDA2's published code, the references of tests/test_llada2.py and
eval/ci/gpu_check_llada2.py (written from the sources, not from dgtune's code):

- `llada2_bd_loss`: dFactory's block-diffusion SFT step (inclusionAI/dFactory `tasks/train_llada2_bd.py`: the
  `block_diffusion_mask` function and the `block_diffusion_mode` branch of the training loop, `same_token_labels`;
  `tasks/dataset/data_transform.py` `process_mdm_sft_example` / `sft_noise_transition`; the noise range of
  `configs/sft/llada2_mini_bd_sft.yaml`), with its shipped micro-batches of one answer: each answer laid out
  unpadded as [prompt ; answer], noised, read as [x_t ; x_0] under the block-diffusion mask, the cross-entropy of its
  masked positions summed / their number / the number of micro-batches.
- `block_causal_4d`: the 4-D mask LLaDA2's own `generate()` builds (`modeling_llada2_moe.py`: tril over blocks,
  repeated block_length times on both axes), here also limiting keys to a 2-D attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_RANGE = (0.3, 0.8)


def block_diffusion_mask(q_idx, kv_idx, block_size, n):
    """dFactory's training mask (True = attend) over [x_t (0 .. n-1) ; x_0 (n .. 2n-1)]."""
    x0_flag_q = q_idx >= n
    x0_flag_kv = kv_idx >= n
    block_q = torch.where(x0_flag_q, (q_idx - n) // block_size, q_idx // block_size)
    block_kv = torch.where(x0_flag_kv, (kv_idx - n) // block_size, kv_idx // block_size)
    block_diagonal = (block_q == block_kv) & (x0_flag_q == x0_flag_kv)
    offset_block_causal = (block_q > block_kv) & x0_flag_kv & ~x0_flag_q
    block_causal = (block_q >= block_kv) & x0_flag_kv & x0_flag_q
    return block_diagonal | offset_block_causal | block_causal


def llada2_bd_loss(model, prompts, answers, t, u, mask_id, block_size):
    """dFactory's loss over micro-batches of one answer each. prompts/answers: lists of 1-D id tensors; t [b]: the
    uniform draw behind each answer's noise level sigma = low + (high - low) t; u [b, l]: the uniform draws of its
    per-token masking (`torch.rand(...) < move_chance`)."""
    total = 0.0
    b = len(prompts)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        input_ids = torch.cat([prompt, answer])[None]  # [1, n]
        n, prompt_length = input_ids.shape[1], len(prompt)
        labels = input_ids.clone()
        labels[:, :prompt_length] = -100
        maskable_mask = torch.arange(n) >= prompt_length
        sigma = t[i] * (NOISE_RANGE[1] - NOISE_RANGE[0]) + NOISE_RANGE[0]
        rand = torch.cat([torch.ones(prompt_length), u[i]])  # the answer's draws; the prompt is never maskable
        move_indices = (rand < sigma) & maskable_mask
        noisy_input_ids = torch.where(move_indices, mask_id, input_ids)
        labels[~(noisy_input_ids == mask_id)] = -100
        flag = block_diffusion_mask(torch.arange(2 * n)[:, None], torch.arange(2 * n)[None, :], block_size, n)
        attn = torch.zeros(flag.shape).masked_fill_(~flag, float("-inf"))[None, None]
        full_input_ids = torch.cat([noisy_input_ids, input_ids], dim=1)
        position_ids = torch.cat([torch.arange(n), torch.arange(n)])[None]
        logits = model(input_ids=full_input_ids, attention_mask=attn, position_ids=position_ids).logits
        noisy_logits = logits[:, :n]
        unscaled = F.cross_entropy(noisy_logits.reshape(-1, noisy_logits.shape[-1]).float(), labels.view(-1),
                                   reduction="none")
        total = total + unscaled.sum() / (labels != -100).sum() / b
    return total


def block_causal_4d(attention_mask: torch.Tensor, block_length: int) -> torch.Tensor:
    """LLaDA2 generate()'s block-diagonal causal mask over a window of whole blocks, keys limited to the 2-D
    `attention_mask` [b, w] (a query always keeps itself). Bool [b, 1, w, w]."""
    w = attention_mask.shape[1]
    num_blocks = w // block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks, device=attention_mask.device))
    full = block_mask.repeat_interleave(block_length, dim=0).repeat_interleave(block_length, dim=1).bool()
    keys = attention_mask.bool()[:, None, :]
    eye = torch.eye(w, dtype=torch.bool, device=attention_mask.device)
    return ((full[None] & keys) | eye[None])[:, None]
