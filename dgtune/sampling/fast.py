"""The fast sampler (`SamplerConfig.mode="fast"`): same model calls and the same algorithms as the reference
sampler, organised for speed and batch invariance.

- The prompt is encoded once; every step reuses its KV cache. With the fused decoder (and one canvas), the prompt
  is encoded by `FusedDecoder.encode_prompt` (the same layer code, causal, the last layer stopping at its keys
  and values).
- Finished rows are retired: the canvas, self-conditioning logits, history and the cache (shallow copies whose
  `layers[i].keys/.values` are index-selected) shrink to the rows still running, every `sync_every` steps (the
  only host sync of the loop; 0 = every step on CPU, every 4 steps on accelerators).
- Temperature, entropy, max-prob, margin, argmax and the Gumbel-max sample come from one pass over the logits
  (`dgtune.sampling.stats.step_stats`, a Triton kernel on CUDA).
- Random numbers are a counter-based hash of (row seed, canvas, step, purpose, position[, vocab id])
  (`dgtune.sampling.rng`): a row's tokens do not depend on the other rows of the batch.
- The decoder is `dgtune.sampling.fused_decoder.FusedDecoder` (`decoder="auto"|"fused"`): the same maths as
  transformers' decoder with weights snapshotted once (LoRA folded in; rebuilt when a parameter changes), fused q/k/v and gate/up matmuls,
  optional bf16 matmuls (`decoder_dtype`), expert-sorted MoE, the prompt cache cast once per canvas;
  `decoder="transformers"` calls the model's own decoder with a precomputed (empty) attention-mask mapping.
- For RL rollouts (`dgtune.rl`): `trace=` records each step (`TraceStep`: input canvas, temperature, draws kept) for
  the trajectory likelihood, and `branch=(step, seeds)` switches each row's random keys at a step, so that rows with
  the same seed and prompt share their draws before it (tree rollouts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dgtune.diffusion.model_calls import decode, embedding_dtype, encode, unwrap
from dgtune.diffusion.model_calls import vocab_size as model_vocab_size
from dgtune.diffusion.objective import loo_to_denoiser_logits
from dgtune.sampling import rng
from dgtune.sampling.config import SampleResult, adaptive_stop, pad_after_eos
from dgtune.sampling.fused_decoder import FusedDecoder, FusedDecoderUnsupported, resolve_dtype
from dgtune.sampling.stats import StepStats, step_stats
from dgtune.sampling.strategies import STRATEGIES, check_strategy, strategy_step, temperature

NO_MASKS = {"full_attention": None, "sliding_attention": None}  # no padding: attention over prompt + canvas


def select_rows(cache, idx: torch.Tensor):
    """A shallow copy of a DynamicCache holding only batch rows `idx` (the original is untouched); a family's own
    cache (the one-stack families' `PromptCache`) selects its rows itself."""
    if hasattr(cache, "select_rows"):
        return cache.select_rows(idx)
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        new.layers.append(layer)
    return new


def resolve_mask_id(model, cfg) -> int | None:
    """The [MASK] id for `noise="mask"` (config, else the model config), None for uniform noise."""
    if cfg.noise != "mask":
        return None
    mid = cfg.mask_token_id
    if mid is None:
        conf = unwrap(model).config
        mid = getattr(conf, "mask_token_id", None) or getattr(conf.text_config, "mask_token_id", None)
    if mid is None:
        raise ValueError("noise='mask' needs SamplerConfig.mask_token_id (the tokenizer's mask_token_id)")
    return int(mid)


def adapter_state(model) -> tuple:
    """Which adapters the model's LoRA layers apply now (active names, disabled, merged): toggling them
    (`with model.disable_adapter():`, `set_adapter`) changes the weights without bumping any parameter version."""
    return tuple((tuple(getattr(m, "active_adapters", ())), bool(getattr(m, "disable_adapters", False)),
                  bool(getattr(m, "merged", False))) for m in model.modules() if hasattr(m, "base_layer"))


def build_decoder(model, cfg, device: torch.device) -> FusedDecoder | None:
    """The fused decoder for `cfg.decoder` ("auto": fused unless the model needs a feature it lacks), or None
    for transformers' decoder. It is kept on the model and reused while no parameter has changed (their in-place
    version counters, which optimizer steps bump), the adapters applied are the same (`adapter_state`) and so are
    the dtype / compile settings."""
    if cfg.decoder not in ("auto", "fused", "transformers"):
        raise ValueError(f"sampler.decoder must be auto, fused or transformers, got {cfg.decoder!r}")
    if cfg.decoder == "transformers":
        return None
    from dgtune.models.family import family_of

    core = unwrap(model)
    if not family_of(core).fused_decoder:
        if cfg.decoder == "fused":
            raise FusedDecoderUnsupported(f"sampler.decoder=fused: no fused decoder for model family {family_of(core).name}")
        return None
    dtype = resolve_dtype(cfg.decoder_dtype, embedding_dtype(core), device)
    key = (dtype, bool(cfg.compile), tuple(p._version for p in model.parameters()), adapter_state(model))
    cached = getattr(core, "_dgtune_fused_decoder", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        dec = FusedDecoder(model, dtype)
    except FusedDecoderUnsupported:
        if cfg.decoder == "fused":
            raise
        return None
    if cfg.compile:
        dec.compile()
    core._dgtune_fused_decoder = (key, dec)
    return dec


def _sync_every(cfg, device) -> int:
    return cfg.sync_every if cfg.sync_every > 0 else (1 if device.type == "cpu" else 4)


def _bind_guide(guide, rows: torch.Tensor, known: torch.Tensor | None):
    """`guide` (see `dgtune.sampling.guide`) as `strategy_step` calls it, (tokens, fixed) -> reject, for the active
    `rows` [a]; template positions (`known` [a, l]) count as fixed and are never rejected."""
    if known is None:
        return lambda tok, fixed: guide(tok, fixed, rows)
    return lambda tok, fixed: guide(tok, fixed | known, rows) & ~known


@dataclass
class CanvasJob:
    """What one canvas' denoising loop reads and never changes (`sample_fast` builds one per canvas)."""

    model: object
    cache: object | None  # the KV cache of the rows' prompts (and earlier canvases); None with `prompt_kv`
    keys: torch.Tensor  # [b] counter-based random keys of the rows (`dgtune.sampling.rng`)
    index: int  # which canvas of the answer (0 = the first)
    length: int  # l, tokens in the canvas
    vocab_size: int
    position_offset: int  # position of the canvas' first token (prompt and earlier canvases before it)
    mask_id: int | None  # noise="mask": the [MASK] id; None: uniform noise
    template: torch.Tensor | None = None  # [b, l] known token ids, -1 where free (clamped, count as committed)
    guide: object = None  # a rule guide (`dgtune.sampling.guide`); its rows index `keys`
    fused: FusedDecoder | None = None  # None: transformers' decoder
    prompt_kv: list | None = None  # the fused decoder's `encode_prompt` output, used instead of `cache`
    trace: list | None = None  # receives one `TraceStep` per step (RL's trajectory likelihood)
    branch: tuple | None = None  # (step s, keys [b]): the draws of steps >= s come from these keys (tree rollouts)


@dataclass
class TraceStep:
    """What one denoising step did, for the trajectory likelihood of `method=rl` (`dgtune.rl.likelihood`): the
    decoder's input, the temperature and the random draws of the step that the model's output decides."""

    rows: torch.Tensor  # [a] the canvas' rows this step ran on
    canvas: torch.Tensor  # [a, l] the decoder's input canvas
    tokens: torch.Tensor  # [a, l] the tokens drawn from softmax(logits / temperature)
    drawn: torch.Tensor  # [a, l] bool: the draws the step kept (accepted / committed samples, a sampled output)
    temperature: float
    noise_level: torch.Tensor | None  # [a] prediction="mean_loo": the t its logits were converted at


@dataclass
class RowState:
    """The loop's state for the rows still being denoised (`rows` [a] index the canvas' rows): what changes every
    step, and what `retire` shrinks when rows finish."""

    rows: torch.Tensor  # [a] active rows -> rows of the canvas
    live: torch.Tensor  # [a] bool: active and not finished
    canvas: torch.Tensor  # [a, l] the current noisy canvas
    committed: torch.Tensor  # [a, l] bool: positions a committing strategy (or the template) fixed
    kept: torch.Tensor  # [a, l] bool: positions that are not noise (read by prediction="mean_loo")
    history: torch.Tensor  # [s, a, l] the last argmax canvases (adaptive stop)
    sc_logits: torch.Tensor | None = None  # [a, l, v] the previous step's processed logits (self-conditioning)

    def retire(self, keep: torch.Tensor) -> None:
        """Keep only the active rows `keep` [a'] (indices into the current active rows)."""
        self.rows, self.live = self.rows[keep], self.live[keep]
        self.canvas, self.committed, self.kept = self.canvas[keep], self.committed[keep], self.kept[keep]
        self.sc_logits = None if self.sc_logits is None else self.sc_logits[keep]
        self.history = self.history[:, keep]


def _start(job: CanvasJob, cfg, device) -> RowState:
    """The first canvas of every row: random tokens (or all [MASK]), template positions set and committed."""
    b, l = job.keys.shape[0], job.length
    init_keys = rng.position_keys(rng.fold(job.keys, job.index, rng.INIT), l)  # [b, l]
    canvas = (rng.randint(init_keys, job.vocab_size) if job.mask_id is None
              else torch.full((b, l), job.mask_id, device=device))
    committed = torch.zeros(b, l, dtype=torch.bool, device=device)
    if job.template is not None:
        known = job.template >= 0  # [b, l]
        canvas, committed = torch.where(known, job.template, canvas), known.clone()
    history = torch.full((max(cfg.stability_threshold, 1), b, l), -1, dtype=torch.long, device=device)
    return RowState(rows=torch.arange(b, device=device), live=torch.ones(b, dtype=torch.bool, device=device),
                    canvas=canvas, committed=committed, kept=committed, history=history)


@torch.no_grad()
def denoise_canvas_fast(job: CanvasJob, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise one canvas for the rows of `job`; returns (output canvas [b, l], nfe [b])."""
    model, l, vocab_size, mask_id, template, guide, fused = (job.model, job.length, job.vocab_size, job.mask_id,
                                                             job.template, job.guide, job.fused)
    b, device = job.keys.shape[0], job.keys.device
    positions = torch.arange(job.position_offset, job.position_offset + l, device=device)[None]
    all_step_keys = rng.step_keys(job.keys, job.index, cfg.max_steps)  # [b, steps, purposes]
    if job.branch is not None:  # rows with the same keys share their first steps, then branch
        at, branch_keys = job.branch
        later = rng.step_keys(branch_keys, job.index, cfg.max_steps)  # [b, steps, purposes]
        all_step_keys = torch.cat([all_step_keys[:, :at], later[:, at:]], 1)
    s = _start(job, cfg, device)
    known = None if template is None else template >= 0  # [b, l]
    # mean_loo: a row's noise level is the share of its free (non-template) positions that are noise, as in training,
    # where t is the corruption rate of the positions the template leaves free
    n_free = torch.full((b,), float(l), device=device) if known is None else (~known).sum(-1).float()  # [b]
    out = torch.empty(b, l, dtype=torch.long, device=device)
    nfe = torch.zeros(b, device=device)
    view, sync_every = job.cache, _sync_every(cfg, device)
    strategy = STRATEGIES[cfg.strategy]
    need_sample = not strategy.commits or cfg.commit == "sample"
    embed_dtype = embedding_dtype(model)
    if fused is not None:
        kv_all = job.prompt_kv if job.prompt_kv is not None else fused.prepare_cache(job.cache)  # [(k, v) [b, kvh, p, d]]
        kv, rope, embed_dtype = kv_all, fused.rope_tables(positions), torch.float32
    for i in range(cfg.max_steps):
        steps_left = cfg.max_steps - i
        rows = s.rows
        if fused is not None:
            raw = fused(s.canvas, kv, rope, s.sc_logits)  # [a, l, v]
        else:
            raw = decode(model, s.canvas, view, self_conditioning_logits=s.sc_logits, decoder_attention_mask=NO_MASKS,
                         decoder_position_ids=positions)  # [a, l, v]
        if mask_id is not None:
            raw[..., mask_id] = float("-inf")  # never predict [MASK]
        if cfg.prediction == "mean_loo":  # leave-one-out output -> denoiser posterior at the canvas' noise level
            free_a = n_free if raw.shape[0] == b else n_free[rows]  # [a]
            t_row = ((~s.kept).sum(-1).float() / free_a.clamp(min=1.0)).clamp(1e-4, 1.0)  # [a] share of free positions that are noise
            raw = loo_to_denoiser_logits(raw, s.canvas, t_row)
        else:
            t_row = None
        a = raw.shape[0]
        t = temperature(steps_left, cfg.max_steps, cfg.t_min, cfg.t_max)
        sk = all_step_keys[:, i] if a == b else all_step_keys[rows, i]  # [a, purposes]
        sample_keys = rng.position_keys(sk[:, rng.SAMPLE], l).view(-1) if need_sample else None
        held = None  # a guide's value columns of `raw` as the model gave them, masked for this step's choice only
        if guide is not None and hasattr(guide, "forbidden") and strategy.commits:
            ids, taken = guide.forbidden(s.canvas, s.committed, rows)  # [k], [a, l, k]
            held = raw[..., ids]  # [a, l, k] (a copy)
            raw[..., ids] = held.masked_fill(taken, float("-inf"))
        st = step_stats(raw.view(a * l, vocab_size), t, noise_keys=sample_keys, backend=cfg.stats_backend)
        if held is not None:
            raw[..., ids] = held  # the self-conditioning input keeps the model's own logits
        st = StepStats(*(x.view(a, l) if x is not None else None for x in st))
        pos_keys = {"renoise": rng.position_keys(sk[:, rng.RENOISE], l) if mask_id is None else sk[:, :1],
                    "score": rng.position_keys(sk[:, rng.SCORE], l) if strategy.random_scores else None}
        tmpl = None if known is None else (template, known) if a == b else (template[rows], known[rows])
        if tmpl is not None:  # known positions: certain (entropy 0), and their token is the template's
            tok, k = tmpl
            st = StepStats(entropy=st.entropy.masked_fill(k, 0.0), max_prob=st.max_prob.masked_fill(k, 1.0),
                           argmax=torch.where(k, tok, st.argmax), margin=st.margin.masked_fill(k, 1.0),
                           sample=None if st.sample is None else torch.where(k, tok, st.sample))
        step_guide = None if guide is None else _bind_guide(guide, rows, None if tmpl is None else tmpl[1])
        canvas_in = s.canvas
        s.canvas, s.committed, output, drawn = strategy_step(cfg, st, s.canvas, s.committed, steps_left, pos_keys,
                                                             vocab_size, mask_id, step_guide)
        if not strategy.commits and cfg.last_step == "sample":
            output = st.sample  # a stopping row outputs its draws (the template's tokens where known)
        # positions of the next canvas that are not noise: committed ones, and entropy_bound's accepted samples
        if cfg.prediction == "mean_loo":
            s.kept = s.committed if strategy.commits else s.committed | (s.canvas == st.sample)
        if tmpl is not None:
            s.canvas, output = torch.where(tmpl[1], tmpl[0], s.canvas), torch.where(tmpl[1], tmpl[0], output)
        nfe.index_add_(0, rows, s.live.float())
        if not strategy.commits:  # adaptive stop: stable argmax and confident
            done, s.history = adaptive_stop(s.history, output, st.entropy, cfg)
        else:
            done = s.committed.all(-1)
        if steps_left == 1:
            done = torch.ones_like(done)
        newly = s.live & done
        if job.trace is not None:
            if not strategy.commits:  # a stopping row's accepted draws are dropped; its output may be a draw
                drawn = torch.where(newly[:, None], cfg.last_step == "sample", drawn)
            drawn = drawn & s.live[:, None] if tmpl is None else drawn & s.live[:, None] & ~tmpl[1]
            job.trace.append(TraceStep(rows.clone(), canvas_in, output if st.sample is None else st.sample, drawn,
                                        float(t), t_row))
        out.index_copy_(0, rows, torch.where(newly[:, None], output, out.index_select(0, rows)))
        s.live = s.live & ~done
        if cfg.self_conditioning:
            s.sc_logits = (raw / t).to(embed_dtype)  # processed logits: next step's self-conditioning
        if steps_left == 1 or (i + 1) % sync_every:
            continue
        keep = s.live.nonzero().squeeze(1)  # host sync
        if keep.numel() == 0:
            break
        if keep.numel() < a:
            s.retire(keep)
            if fused is not None:
                kv = [(k.index_select(0, s.rows), v.index_select(0, s.rows)) for k, v in kv_all]
            else:
                view = select_rows(job.cache, s.rows)
    return out, nfe


@torch.no_grad()
def sample_fast(model, prompt_ids: torch.Tensor, cfg, generator: torch.Generator | None, eos_id: int, pad_id: int,
                canvas_length: int | None = None, row_seeds: torch.Tensor | None = None,
                template: torch.Tensor | None = None, guide=None, trace: list | None = None,
                branch: tuple | None = None):
    """Fast sampling of equal-length prompts [b, p]; returns SampleResult(tokens [b, n_canvases * l], nfe [b]).
    template [b, l] (first canvas), guide and trace (one canvas only): see `CanvasJob`; branch = (step, seeds [b]):
    from that step of the first canvas on, each row draws from its own `seeds` (rows that share `row_seeds` and a
    prompt share their draws before it: the nodes of a rollout tree)."""
    check_strategy(cfg)
    if trace is not None and cfg.max_canvases != 1:
        raise ValueError("a sampler trace covers one canvas: set sampler.max_canvases=1")
    core_cfg = unwrap(model).config
    canvas_length = canvas_length or core_cfg.canvas_length
    vocab_size = model_vocab_size(model)
    b, p = prompt_ids.shape
    device = prompt_ids.device
    if row_seeds is None:
        if generator is None:
            raise ValueError("sample_fast needs a generator or row_seeds")
        row_seeds = rng.row_seeds_from(generator, b)
    keys = rng.seed_keys(row_seeds.to(device))  # [b]
    mask_id = resolve_mask_id(model, cfg)
    fused = build_decoder(model, cfg, device)
    prompt_kv = None
    if fused is not None and fused.can_encode and cfg.max_canvases == 1:  # (continuing canvases needs a cache)
        cache, prompt_kv = None, fused.encode_prompt(prompt_ids)
    else:
        cache, _ = encode(model, prompt_ids)
    tokens = torch.full((b, cfg.max_canvases * canvas_length), pad_id, dtype=torch.long, device=device)
    nfe = torch.zeros(b, device=device)
    alive = torch.arange(b, device=device)  # rows without EOS so far
    cur_len, n_canvases = p, 0
    for k in range(cfg.max_canvases):
        job = CanvasJob(model, cache, keys[alive], k, canvas_length, vocab_size, cur_len, mask_id,
                        template if k == 0 else None, guide if k == 0 else None, fused, prompt_kv, trace,
                        None if branch is None or k else (int(branch[0]), rng.seed_keys(branch[1].to(device))))
        out, n = denoise_canvas_fast(job, cfg)
        tokens[alive, k * canvas_length:(k + 1) * canvas_length] = out
        nfe.index_add_(0, alive, n)
        n_canvases = k + 1
        keep = (~(out == eos_id).any(-1)).nonzero().squeeze(1)
        if keep.numel() == 0 or k + 1 == cfg.max_canvases:
            break
        cache, alive = select_rows(cache, keep), alive[keep]
        positions = torch.arange(cur_len, cur_len + canvas_length, device=device)[None]
        cache, _ = encode(model, out[keep], cache=cache, position_ids=positions)
        cur_len += canvas_length
    return SampleResult(tokens=pad_after_eos(tokens[:, : n_canvases * canvas_length], eos_id, pad_id), nfe=nfe)
