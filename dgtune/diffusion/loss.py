"""One training loss evaluation: corrupt the canvas, self-condition, denoise, and add the encoder's AR co-loss."""

from __future__ import annotations

import torch

from dgtune.diffusion.chunked import chunked_ar_loss, chunked_canvas_loss
from dgtune.diffusion.model_calls import (
    block_diffusion,
    decode_hidden,
    decoder_context,
    encode,
    lm_head_weight,
    lm_logits,
    self_conditioning_embeddings,
    training_cache,
)
from dgtune.diffusion.objective import (
    ObjectiveConfig,
    ar_co_loss,
    ar_targets,
    canvas_cross_entropy,
    corrupt_further,
    loo_to_denoiser_logits,
    noise_for,
    sample_noise_level,
    softcap,
)


def task_aux_loss(model, hidden: torch.Tensor, task, token_ids: torch.Tensor, clean: torch.Tensor,
                  keep: torch.Tensor | None) -> torch.Tensor:
    """The task's auxiliary loss on the graded pass: the decoder's distribution over the task's tokens
    (`task.aux_token_ids`, renormalised over them; only those k rows of the LM head are used, so no [b, l, v]
    logits), handed to `task.aux_loss(probs [b, l, k], clean [b, l], keep [b, l] | None, token_ids [k])`."""
    weight, cap = lm_head_weight(model)
    ids = token_ids.to(hidden.device)
    logits = softcap(hidden @ weight[ids].to(hidden.dtype).T, cap)  # [b, l, k]
    return task.aux_loss(logits.softmax(-1), clean, keep, ids)


def pick_blocks(
    canvas: torch.Tensor, keep: torch.Tensor | None, prompt_len: torch.Tensor, block_count: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One block (canvas) per row of answers that span several: k = floor(u * block_count), u ~ U(0, 1) drawn from
    `generator` (uniform over the blocks the answer + EOS covers, as Google's reference and unsloth's trainer do).

    canvas, keep: [b, n l] (keep optional); prompt_len, block_count: [b]. Returns (canvas block [b, l], keep block
    [b, l] or None, context length prompt_len + k l [b]: the decoder sees the prompt and the k clean earlier blocks,
    and block k's positions start there). Without block_count, or when every row fits one canvas, nothing is drawn
    and (canvas, keep, prompt_len) come back as they are."""
    if block_count is None or int(block_count.max()) <= 1:
        return canvas, keep, prompt_len
    b, width = canvas.shape
    n = int(block_count.max())
    if width % n:
        raise ValueError(f"canvas width {width} is not a multiple of the {n} blocks of the longest answer")
    l = width // n
    u = torch.rand(b, generator=generator, device=canvas.device)  # [b]
    k = torch.minimum((u * block_count).long(), block_count - 1)  # [b]
    cols = k[:, None] * l + torch.arange(l, device=canvas.device)[None, :]  # [b, l]
    return canvas.gather(1, cols), None if keep is None else keep.gather(1, cols), prompt_len + k * l


def denoising_loss(
    model, batch: dict, cfg: ObjectiveConfig, generator: torch.Generator, vocab_size: int, mask_token_id: int | None,
    rows: slice | None = None, aux: tuple | None = None, processes: int = 1,
) -> dict[str, torch.Tensor]:
    """Loss of one batch (with `prediction="mean_loo"` the self-conditioning pass's output is converted to the
    denoiser posterior before it conditions the graded pass, as when sampling). Random draws, in order: (answers of
    several canvases only) the block u [b], t [b], corruption [b, l] (+ random tokens), self-cond gate [b],
    then with `sc_noise_gap` > 0 the self-conditioning canvas' extra corruption [b, l] (+ random tokens).

    batch: input_ids [b, s] (prompt + response + EOS, right-padded), attention_mask [b, s], prompt_len [b],
    canvas [b, l] (clean response, EOS-filled), optional canvas_keep [b, l] (template positions, never corrupted).
    Answers longer than one canvas: canvas [b, n l] and canvas_keep [b, n l] hold n blocks and block_count [b] says
    how many of them each row's answer (+ EOS) covers; one block k is picked per row (`pick_blocks`) and the decoder
    denoises it seeing the cache up to its start (prompt + the k clean earlier blocks), positions continuing there.
    rows: this process' slice of a global batch: every draw is made for the whole batch, then sliced, so N processes
    see exactly the draws of one process with the whole batch. The per-position weights (and the AR co-loss'
    denominator) are those of the whole batch too, so the slice's loss is its share of the global loss, whatever its
    rows' free, masked or prompt token counts (a law that normalises over the batch, as the flat, Dream and SDAR
    laws do, would otherwise weigh each process' tokens by its own count); it is returned times `processes`, so
    that the mean over the processes of their losses (DDP averages their gradients) is the global batch's loss.
    aux: (task, token ids [k]) with `cfg.aux_weight` > 0: add `cfg.aux_weight` x `task_aux_loss` (no random draws).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    clean, prompt_len = batch["canvas"], batch["prompt_len"]
    keep = batch.get("canvas_keep")
    b, s = input_ids.shape
    device = input_ids.device
    # ctx_len [b]: what the decoder sees of the cache (the prompt, and with several blocks the clean earlier ones)
    clean, keep, ctx_len = pick_blocks(clean, keep, prompt_len, batch.get("block_count"), generator)
    l = clean.shape[1]

    # Corruption: the objective's noise kind (`dgtune.diffusion.objective.NOISES`)
    noise = noise_for(cfg)
    t = sample_noise_level(b, cfg.eps, generator, device, cfg.t_power)  # [b]
    noisy, corrupted, *redrawn = noise.corrupt(clean, t, vocab_size, mask_token_id, generator, keep)  # [b, l] x2
    t = redrawn[0] if redrawn else t  # a law that redraws empty rows' levels (sdar) returns them
    sc_gate = torch.rand(b, generator=generator, device=device) < cfg.self_cond_p  # [b]

    sc_input = t_sc = None  # the self-conditioning pass' canvas [b, l] and its noise level [b], when it runs
    if cfg.self_cond_p > 0 and bool(sc_gate.any()):
        sc_input, t_sc = noisy, t
        if cfg.sc_noise_gap > 0:  # as when sampling: the previous logits came from a noisier canvas
            t_more = (t + cfg.sc_noise_gap).clamp(max=1.0 - cfg.eps)  # [b]
            t_sc = t_more
            replacement = noise.replacement(clean, vocab_size, mask_token_id, generator)  # [b, l]
            sc_input, _ = corrupt_further(noisy, corrupted, t, t_more, replacement, generator, keep)

    # The encoder reads the whole clean sequence (its AR co-loss covers it); the decoder sees only the prompt part
    # of the cache, and its canvas positions continue right after the prompt. Without the co-loss the response
    # is not needed in the cache at all (the encoder is causal), so only the prompts are encoded.
    if cfg.ar_weight == 0:
        s = int(ctx_len.max())
        input_ids, attention_mask = input_ids[:, :s], attention_mask[:, :s]
    # The noise law's per-position weights and the AR co-loss' pair count, of the whole (global) batch
    weight = None if keep is None else (~keep).float()  # template positions are given, not predicted
    token_weight = noise.token_weights(clean, corrupted, t, weight, cfg)  # [b, l]
    ar_pairs = ar_targets(input_ids, attention_mask)[1].sum() if cfg.ar_weight > 0 and rows is not None else None
    share = 1.0  # the slice's rows / the batch's (for the aux loss, a mean over its rows)
    if rows is not None:  # this process' rows of the global batch (draws above were made for all of them)
        input_ids, attention_mask, clean, ctx_len, keep, t, noisy, corrupted, sc_gate, sc_input, t_sc, token_weight = (
            None if x is None else x[rows]
            for x in (input_ids, attention_mask, clean, ctx_len, keep, t, noisy, corrupted, sc_gate, sc_input, t_sc,
                      token_weight)
        )
        share = input_ids.shape[0] / b
        b = input_ids.shape[0]
    # With sliding-window layers the decoder's cache and masks are cut per row to what sampling sees.
    cache, enc_hidden = encode(model, input_ids, attention_mask, cache=training_cache(model))
    cache, dec_mask = decoder_context(model, cache, ctx_len, l)  # mask [b, s + l] or {layer type: 4D}
    dec_pos = ctx_len[:, None] + torch.arange(l, device=device)[None, :]  # [b, l]

    # objective.loss_chunk > 0: no [b, l, v] logits; losses and the self-conditioning input come from hidden states
    chunk = cfg.loss_chunk
    sc_logits = sc_embeds = None
    if sc_input is not None:
        with torch.no_grad():
            sc_hidden = decode_hidden(model, sc_input, cache, decoder_attention_mask=dec_mask,
                                      decoder_position_ids=dec_pos)  # [b, l, d]
            sc_logits = None if chunk else lm_logits(model, sc_hidden)  # [b, l, v]
            # mean_loo: condition on the denoiser posterior the first pass implies, as the sampler does (and Google's
            # reference), not on the raw leave-one-out logits
            loo = (sc_input, t_sc) if cfg.prediction == "mean_loo" else None
            if loo is not None and sc_logits is not None:
                sc_logits = loo_to_denoiser_logits(sc_logits, *loo)
        if chunk:
            sc_embeds = self_conditioning_embeddings(model, sc_hidden, sc_gate, chunk, loo)  # [b, l, d]
    hidden = decode_hidden(
        model,
        noisy,
        cache,
        self_conditioning_logits=sc_logits,
        self_conditioning_mask=sc_gate if sc_logits is not None else None,
        decoder_attention_mask=dec_mask,
        decoder_position_ids=dec_pos,
        self_conditioning_embeddings=sc_embeds,
        clean_canvas=clean if block_diffusion(model) else None,  # block diffusion: every block beside clean context
    )  # [b, l, d]

    # The head: the canvas cross-entropy with the noise kind's per-position weights, from full logits or chunked
    loo = cfg.prediction == "mean_loo"  # the decoder predicts the leave-one-out posterior
    if chunk:
        lm_weight, cap = lm_head_weight(model)
        diff = chunked_canvas_loss(hidden, lm_weight, cap, chunk, clean, noisy, t, token_weight, loo)
        ar = (chunked_ar_loss(enc_hidden, lm_weight, cap, chunk, input_ids, attention_mask, ar_pairs)
              if cfg.ar_weight > 0 else None)
    else:
        logits = lm_logits(model, hidden)  # [b, l, v]
        if loo:
            logits = loo_to_denoiser_logits(logits, noisy, t)
        diff = canvas_cross_entropy(logits, clean, token_weight)
        ar = ar_co_loss(lm_logits(model, enc_hidden), input_ids, attention_mask, ar_pairs) if cfg.ar_weight > 0 else None
    loss = diff if ar is None else diff + cfg.ar_weight * ar
    out = {"diffusion_loss": diff.detach()}
    if ar is not None:
        out["ar_loss"] = ar.detach()
    if cfg.aux_weight > 0:
        if aux is None:
            raise ValueError("objective.aux_weight > 0 needs a task with an auxiliary loss (aux_token_ids, aux_loss)")
        aux_l = task_aux_loss(model, hidden, aux[0], aux[1], clean, keep) * share  # its share: a mean over rows
        loss = loss + cfg.aux_weight * aux_l
        out["aux_loss"] = aux_l.detach()
    if rows is not None:  # the share of the global loss x the processes: their mean is the global loss
        loss, out = loss * processes, {k: v * processes for k, v in out.items()}
    return {"loss": loss, **out}


class DenoisingLoss(torch.nn.Module):
    """`denoising_loss` as a module around the model, for accelerate to wrap (DDP, FSDP, DeepSpeed).

    The whole loss (encoder, no-grad self-conditioning pass, graded decoder pass, AR co-loss) runs inside this
    forward, so the wrapper's hooks (gradient all-reduce, parameter gathering) see every model call; calling the
    encoder and decoder of a wrapped model directly would bypass them. Sampling, eval and checkpoints use `.model`.
    """

    def __init__(self, model, cfg: ObjectiveConfig, vocab_size: int, mask_token_id: int | None, aux: tuple | None = None,
                 processes: int = 1):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.aux = aux  # (task, token ids [k]) for objective.aux_weight > 0
        self.processes = processes  # the processes that share each global batch (`denoising_loss`)

    def forward(self, batch: dict, generator: torch.Generator, rows: slice | None = None) -> dict[str, torch.Tensor]:
        """The loss dict of `denoising_loss` for `rows` of the (global) batch."""
        return denoising_loss(self.model, batch, self.cfg, generator, self.vocab_size, self.mask_token_id, rows, self.aux,
                              self.processes)
