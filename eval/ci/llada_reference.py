"""Plain transcriptions of LLaDA's published code, the references dgtune's LLaDA family is checked against
(tests/test_llada.py on the tiny LLaDA; eval/ci/gpu_check_llada.py on the real weights).

- `guidelines_sft_loss`: ML-GSAI/LLaDA `GUIDELINES.md`, section "SFT" (forward_process with eps 1e-3, prompt never
  masked, CE / p_mask over the masked positions, / answer length incl. EOS padding, / batch size).
- `llada_generate`: ML-GSAI/LLaDA `generate.py` `generate()` with block_length = gen_length, temperature 0,
  cfg_scale 0, remasking "low_confidence" (`get_num_transfer_tokens` for the per-step counts).
"""

import torch
import torch.nn.functional as F


def guidelines_sft_loss(model, prompts, answers, t, u, mask_id):
    """ML-GSAI/LLaDA GUIDELINES.md "SFT", transcribed per row (each row its own prompt length): p = (1 - 1e-3) t + 1e-3,
    answer positions with u < p masked, CE / p over the masked positions, / the answer length, summed, / the batch.
    t [b] and u [b, l] are the draws (the answer part of GUIDELINES' torch.rand((b, l)))."""
    total = 0.0
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        input_ids = torch.cat([prompt, answer])[None]  # [1, p + l]
        p_len = prompt.shape[0]
        p_mask = (1 - 1e-3) * t[i] + 1e-3
        masked = torch.zeros_like(input_ids, dtype=torch.bool)
        masked[0, p_len:] = u[i] < p_mask
        noisy = torch.where(masked, mask_id, input_ids)
        logits = model(input_ids=noisy).logits
        token_loss = F.cross_entropy(logits[masked], input_ids[masked], reduction="none") / p_mask
        answer_length = input_ids.shape[1] - p_len
        total = total + torch.sum(token_loss / answer_length)
    return total / len(prompts)


def llada_generate(model, prompt, steps, gen_length, mask_id, block_length=None):
    """ML-GSAI/LLaDA generate.py `generate(..., block_length, temperature=0., cfg_scale=0.,
    remasking='low_confidence')`, transcribed (the Gumbel noise at temperature 0 leaves the logits as they are):
    semi-autoregressive blocks of `block_length` (default: one block of `gen_length`), each with steps // blocks
    steps; each step the k most confident masked positions take their argmax, k from `get_num_transfer_tokens` (the
    block's mask count // its steps, the remainder one each to the first steps), confidence in float64 and -inf
    after the current block."""
    block_length = block_length or gen_length
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    p_len = prompt.shape[1]
    x = torch.full((1, p_len + gen_length), mask_id, dtype=torch.long)
    x[:, :p_len] = prompt
    for num_block in range(num_blocks):
        lo, hi = p_len + num_block * block_length, p_len + (num_block + 1) * block_length
        masked = (x[:, lo:hi] == mask_id).sum(dim=1, keepdim=True)
        transfer = torch.zeros(1, steps, dtype=torch.int64) + masked // steps
        transfer[0, : int(masked % steps)] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x).logits
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            _, select = torch.topk(confidence[0], k=int(transfer[0, i]))
            x[0, select] = x0[0, select]
    return x[:, p_len:]
