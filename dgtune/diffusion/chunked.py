"""The training losses without full-vocabulary logits: cross-entropy from final hidden states and the LM-head weight,
a chunk of tokens at a time.

At DiffusionGemma 26B's vocabulary (262,144) the plain path's float32 soft-capped logits are b x l x 1 MiB for the
canvas (and as much again for its softmax, its tanh and their gradients) and b x s x 1 MiB for the encoder's AR
co-loss. Here each chunk of `chunk` tokens builds its logits [chunk, v], soft-caps them (Gemma's tanh(x/cap)*cap),
adds its loss, and, when a backward will follow, its gradients with respect to the hidden states and the LM-head
weight right away (d ce / d logits = softmax - onehot needs nothing else); the chunk's logits are then freed, and
backward only scales the stored gradients. Same values and gradients as the plain path, with the same matmuls
(one forward, two backward per chunk), so no recomputation.

The self-conditioning input (the decoder reads its first pass' logits only as softmax(logits) @ embedding) is built
the same way, chunk by chunk, by `soft_embeddings`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dgtune.diffusion.objective import ar_targets, loo_log_likelihoods


def softcapped_logits(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None) -> torch.Tensor:
    """LM-head logits tanh(h W^T / cap) * cap in float32 (as `objective.softcap`). hidden [n, d], weight [v, d]."""
    logits = F.linear(hidden, weight).float()  # [n, v]
    return logits if cap is None else torch.tanh(logits / cap) * cap


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(softcap(h_i W^T) + offsets_i, target_i), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, cap, chunk, logit_offset, observed, observed_offset,
                grad_hidden_needed, grad_weight_needed):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None  # [n, d]
        grad_weight = None  # [v, d], accumulated over chunks in float32
        if grad_weight_needed:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            h = hidden[rows]  # [c, d]
            c = h.shape[0]
            raw = F.linear(h, weight)  # [c, v] (bf16 under bf16 autocast)
            raw_dtype = raw.dtype
            raw = raw.float()
            tanh = None if cap is None else raw.div_(cap).tanh_()  # [c, v], in place of raw
            logits = raw if cap is None else tanh * cap  # [c, v]
            del raw
            if logit_offset is not None:  # mean_loo: + log q(y | x), log_other everywhere, log_same at y
                at_observed = logits.gather(1, observed[rows, None]) + observed_offset[rows, None]  # [c, 1]
                logits = logits + logit_offset[rows, None]
                logits.scatter_(1, observed[rows, None], at_observed)
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            ce = lse - logits.gather(1, target[rows, None]).squeeze(1)  # [c]
            w = token_weight[rows]  # [c]
            total = total + (ce * w).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax [c, v], in place of the logits
            g[torch.arange(c, device=g.device), target[rows]] -= 1.0
            g.mul_(w[:, None])
            if tanh is not None:  # d softcap / d raw = 1 - tanh^2
                g.mul_(tanh.mul_(tanh).neg_().add_(1.0))
            del tanh
            g = g.to(raw_dtype)  # as the plain backward, which casts d logits back to the matmul's dtype
            if grad_hidden is not None:
                grad_hidden[rows] = (g @ weight).to(hidden.dtype)  # [c, d]
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()  # [v, d]
            del g
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_out.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight * grad_out.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor, cap: float | None,
    chunk: int, logit_offset: torch.Tensor | None = None, observed: torch.Tensor | None = None,
    observed_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i token_weight_i * CE(z_i, target_i), z_i = softcap(hidden_i W^T) (+ logit_offset_i on every id, but
    observed_offset_i instead on id observed_i), never more than `chunk` rows of logits at once.

    hidden [n, d], weight [v, d] (the LM head), target [n] (valid ids; weight 0 to ignore), token_weight [n];
    the optional offsets (mean_loo's log q(y | x)) and observed ids are [n]. Returns a float32 scalar whose
    backward reaches `hidden` and `weight` (where they require grad).
    """
    if chunk <= 0:
        raise ValueError(f"loss chunk={chunk}: expected a positive number of tokens")
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden, weight, target, token_weight.float(), cap, chunk, logit_offset, observed, observed_offset,
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )


def chunked_canvas_loss(
    hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, chunk: int, clean: torch.Tensor,
    noisy: torch.Tensor, t: torch.Tensor, token_weight: torch.Tensor, loo: bool,
) -> torch.Tensor:
    """The canvas loss of `denoising_loss` from the decoder's final hidden states [b, l, d], `chunk` tokens at a
    time: sum of `token_weight` [b, l] (the noise kind's, `Noise.token_weights`) x cross-entropy of the clean tokens
    [b, l]; with `loo` (prediction mean_loo) of the denoising posterior implied at the observed tokens `noisy`
    [b, l] and levels t [b]."""
    b, l = clean.shape
    h = hidden.reshape(b * l, -1)  # [b l, d]
    if not loo:
        return linear_cross_entropy(h, weight, clean.flatten(), token_weight.flatten(), cap, chunk)
    log_other, log_same = loo_log_likelihoods(t.float(), weight.shape[0])  # [b], [b]
    return linear_cross_entropy(
        h, weight, clean.flatten(), token_weight.flatten(), cap, chunk, log_other.repeat_interleave(l),
        noisy.flatten(), log_same.repeat_interleave(l),
    )


def chunked_ar_loss(
    hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, chunk: int, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The encoder's AR co-loss (`objective.ar_co_loss`, the same `pairs`) from its final hidden states [b, s, d]."""
    next_ids, valid = ar_targets(input_ids, attention_mask)  # [b, s-1], [b, s-1]
    w = valid.float() / (valid.sum() if pairs is None else pairs).clamp(min=1)  # the sum over valid pairs / pairs
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b (s-1), d]
    return linear_cross_entropy(h, weight, next_ids.flatten(), w.flatten(), cap, chunk)


def soft_embeddings(
    hidden: torch.Tensor, lm_weight: torch.Tensor, embed_weight: torch.Tensor, embed_scale: torch.Tensor,
    cap: float | None, chunk: int, mask: torch.Tensor | None = None,
    loo: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The decoder's self-conditioning signal softmax(softcap(h W^T)) @ E * embed_scale, zero where mask [b] is
    False, `chunk` tokens at a time (what `DiffusionGemmaDecoderModel` computes from `self_conditioning_logits`).

    hidden [b, l, d] from a no-grad decoder pass; lm_weight [v, d] (no gradient through the logits, as in the
    plain path, where they come from that no-grad pass); embed_weight [v, d] gets its gradient (full fine-tuning)
    through a per-chunk `checkpoint`, which recomputes the chunk's softmax in backward. Returns [b, l, d].
    """
    b, l, d = hidden.shape
    h = hidden.detach().reshape(b * l, d)  # [b l, d]
    lm_weight = lm_weight.detach()
    offsets = None
    if loo is not None:  # mean_loo: softmax of the denoiser posterior, logits + log q(y | x) (as loo_to_denoiser_logits)
        observed, t = loo  # [b, l], [b]
        log_other, log_same = loo_log_likelihoods(t.float(), lm_weight.shape[0])  # [b], [b]
        offsets = (observed.reshape(-1), log_other.repeat_interleave(l), log_same.repeat_interleave(l))  # [b l] each

    def one_chunk(rows: torch.Tensor, start: int) -> torch.Tensor:
        logits = softcapped_logits(rows, lm_weight, cap)  # [c, v]
        if offsets is not None:
            obs, other, same = (x[start:start + rows.shape[0]] for x in offsets)  # [c]
            hit = torch.nn.functional.one_hot(obs, logits.shape[-1]).bool()  # [c, v]
            logits = logits + torch.where(hit, same[:, None], other[:, None])
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # [c, v]
        return torch.matmul(probs.to(embed_weight.dtype), embed_weight)  # [c, d]

    grad = torch.is_grad_enabled() and embed_weight.requires_grad
    parts = [checkpoint(one_chunk, h[i:i + chunk], i, use_reentrant=False) if grad else one_chunk(h[i:i + chunk], i)
             for i in range(0, b * l, chunk)]
    out = torch.cat(parts).view(b, l, -1)  # [b, l, d]
    out = out * embed_scale.to(embed_weight.dtype)
    if mask is not None:
        out = out * mask.to(out.dtype)[:, None, None]
    return out
