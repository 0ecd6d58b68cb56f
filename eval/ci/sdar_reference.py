"""A plain transcription of SDAR's published training step, the reference of tests/test_sdar.py and
eval/ci/gpu_check_sdar.py (written from the source, not from dgtune's code): JetAstra/SDAR
`training/model/SDAR-4B-Chat/modeling_sdar.py`, the training branch of `SDARForCausalLM.forward` with
`prepare_for_bd_training`, `forward_add_noise_packed`, `calculate_token_nums`, `modify_padded_position_ids_2d`,
`block_diff_mask` / `block_attn_mask`, and the loss of `fused_linear_diffusion_cross_entropy.py` (cross-entropy / p_mask,
reduction sum) / `answer_len`. The batch is what SDAR's LLaMA-Factory fork feeds it without packing: one answer per
row (prompt labels -100, answer labels its tokens), right-padded with pad tokens whose labels are -100 and whose
position ids restart at 0 (`modify_padded_position_ids_2d`), so the padding is a segment of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-3  # forward_add_noise_packed(eps=1e-3)
MAX_TRIES = 10  # forward_add_noise_packed(max_tries=10)


def calculate_token_nums(position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each row's segment lengths: a segment starts where the position id is 0."""
    out = []
    for row in position_ids:
        zeros = torch.nonzero(row == 0).flatten()
        out.append(torch.diff(torch.cat([zeros, torch.tensor([row.shape[0]], device=row.device)])))
    return out


def block_diff_mask(q_idx, kv_idx, block_size, n):
    """SDAR's training mask (True = attend) over [x_t (0 .. n-1) ; x_0 (n .. 2n-1)] of one segment."""
    x0_flag_q = q_idx >= n
    x0_flag_kv = kv_idx >= n
    block_q = torch.where(x0_flag_q == 1, (q_idx - n) // block_size, q_idx // block_size)
    block_kv = torch.where(x0_flag_kv == 1, (kv_idx - n) // block_size, kv_idx // block_size)
    block_diagonal = (block_q == block_kv) & (x0_flag_q == x0_flag_kv)
    offset_block_causal = (block_q > block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 0)
    block_causal = (block_q >= block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 1)
    return block_diagonal | offset_block_causal | block_causal


def block_attn_mask(num_tokens, block_size, device="cpu"):
    """[b, 2 s, 2 s]: each segment's [x_t ; x_0] mask on the block diagonal."""
    masks = []
    for row in num_tokens:
        parts = [block_diff_mask(torch.arange(int(n) * 2, device=device)[:, None],
                                 torch.arange(int(n) * 2, device=device)[None, :], block_size, int(n)) for n in row]
        masks.append(torch.block_diag(*parts))
    return torch.stack(masks)


def sdar_loss(model, prompts, answers, t_tries, u_tries, mask_id, pad_id, block_size, given=None):
    """SDAR's training loss of one batch. prompts / answers: lists of 1-D id tensors (equal answer lengths l);
    t_tries [T, b] and u_tries [T, b, l]: the uniform draws of each row's tries (SDAR: `torch.rand` for the level,
    `torch.rand_like` for the per-token masking; the prompt's draws never matter, it is not eligible). The model
    runs in training mode (restored after), its attention given a flex-attention BlockMask (as
    `prepare_for_bd_training` makes). given [b, l] (optional): answer positions labelled -100 (a canvas template's
    positions: never masked, not counted in `answer_len`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, dev = len(prompts), prompts[0].device
    lens = [len(p) + len(a) for p, a in zip(prompts, answers)]
    n = max(lens)
    input_ids = torch.full((b, n), pad_id, device=dev)
    labels = torch.full((b, n), -100, device=dev)
    position_ids = torch.zeros(b, n, dtype=torch.long, device=dev)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        input_ids[i, : lens[i]] = torch.cat([p, a])
        labels[i, len(p): lens[i]] = a if given is None else torch.where(given[i], -100, a)
        position_ids[i, : lens[i]] = torch.arange(lens[i], device=dev)
        position_ids[i, lens[i]:] = torch.arange(n - lens[i], device=dev)  # modify_padded_position_ids_2d
    prompt_mask = labels == -100
    num_tokens = calculate_token_nums(position_ids)

    # forward_add_noise_packed, its torch.rand draws replaced by the given ones
    noisy = input_ids.clone()
    masked = torch.zeros(b, n, dtype=torch.bool, device=dev)
    p_full = torch.zeros(b, n, device=dev)
    for i in range(b):
        eligible = ~prompt_mask[i]
        for k in range(MAX_TRIES):
            p_mask = (1 - EPS) * t_tries[k, i] + EPS  # the answer's segment (the padding's level never matters)
            rand = torch.ones(n, device=dev)
            rand[len(prompts[i]): lens[i]] = u_tries[k, i]
            item = (rand < p_mask) & eligible
            if item.any():
                break
        if not item.any():
            raise AssertionError("no try masked anything: the forced mask is not transcribed here")
        masked[i], p_full[i] = item, p_mask
        noisy[i] = torch.where(item, mask_id, input_ids[i])
    p_masks = p_full[masked]

    # prepare_for_bd_training: per segment [x_t ; x_0], position ids repeated, the noisy half's masked positions kept
    concat_ids = torch.zeros(b, 2 * n, dtype=torch.long, device=dev)
    concat_pos = torch.zeros(b, 2 * n, dtype=torch.long, device=dev)
    keep = torch.zeros(b, 2 * n, dtype=torch.bool, device=dev)
    for i in range(b):
        noisy_part = (torch.arange(len(num_tokens[i]) * 2, device=dev) % 2 == 0).repeat_interleave(
            num_tokens[i].repeat_interleave(2))
        concat_ids[i][noisy_part], concat_ids[i][~noisy_part] = noisy[i], input_ids[i]
        keep[i][noisy_part] = masked[i]
        concat_pos[i][noisy_part], concat_pos[i][~noisy_part] = position_ids[i], position_ids[i]
    attention = block_attn_mask(num_tokens, block_size, dev)
    block_mask = create_block_mask(lambda bb, hh, q, kv: attention[bb, q, kv], B=b, H=None, Q_LEN=2 * n, KV_LEN=2 * n,
                                   device=dev)
    was_training = model.training
    model.train()  # SDAR's training branch: flex attention under the BlockMask
    try:
        hidden = model.model(input_ids=concat_ids, attention_mask=block_mask, position_ids=concat_pos)[0]
    finally:
        model.train(was_training)
    hidden = hidden[keep]  # [masked, d]
    logits = F.linear(hidden, model.lm_head.weight).float()
    loss = (F.cross_entropy(logits, labels[masked], reduction="none") / p_masks).sum()
    return loss / (labels != -100).sum()


@torch.no_grad()
def sdar_generate(model, prompt, mask_id, gen_length, block_length, denoising_steps, confidence_threshold,
                  stop_ids, generator, temperature=1.0):
    """SDAR's `generate.py` `block_diffusion_generate` (remasking_strategy `low_confidence_dynamic`, top_k 0, top_p 1;
    one prompt [1, p]) without its KV cache: each step runs the model over the sequence up to the current block
    under the same block-causal mask (the cache holds exactly those keys and values), in eval mode with the 1/0
    mask its attention reads with `.bool()`. Its `torch.multinomial` draws come from `generator`. Returns x [1, n]:
    the prompt, the answer blocks decoded, [MASK] after the block where a stop id appeared."""
    prompt_length, dev = prompt.shape[1], prompt.device
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks, device=dev))
    attention = block_mask.repeat_interleave(block_length, dim=0).repeat_interleave(block_length, dim=1).unsqueeze(0)
    position_ids = torch.arange(total_length, device=dev).unsqueeze(0)
    x = torch.full((1, total_length), mask_id, dtype=torch.long, device=dev)
    x[:, :prompt_length] = prompt
    prefill_blocks = prompt_length // block_length
    base, remainder = block_length // denoising_steps, block_length % denoising_steps
    num_transfer_tokens = torch.zeros(denoising_steps, dtype=torch.int64) + base
    num_transfer_tokens[:remainder] += 1
    for num_block in range(prefill_blocks, num_blocks):
        lo, hi = num_block * block_length, (num_block + 1) * block_length
        cur_x = x[:, lo:hi].clone()
        for step in range(denoising_steps + 1):
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                break
            window = torch.cat([x[:, :lo], cur_x], dim=1)
            hidden = model.model(input_ids=window, attention_mask=attention[:, :hi, :hi][:, None],
                                 position_ids=position_ids[:, :hi])[0]
            logits = model.lm_head(hidden[:, lo:hi]).float()
            flat = logits.reshape(-1, logits.shape[-1])
            if temperature != 1.0:
                flat = flat / temperature
            probs = F.softmax(flat, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=generator)
            x0, x0_p = token.view(1, -1), torch.gather(probs, -1, token).view(1, -1)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                high_conf_mask = confidence[j] > confidence_threshold
                if high_conf_mask.sum() >= num_transfer_tokens[step]:
                    transfer_index[j] = high_conf_mask
                else:
                    _, idx = torch.topk(confidence[j], int(num_transfer_tokens[step]))
                    transfer_index[j, idx] = True
            cur_x[transfer_index] = x0[transfer_index]
        x[:, lo:hi] = cur_x
        if any(stop in x[:, prompt_length:] for stop in stop_ids):
            break
    return x
