"""An inference-only DiffusionGemma decoder for the fast sampler (`SamplerConfig.decoder="fused"`).

The same maths as `DiffusionGemmaDecoderModel` + LM head (tests/test_fused_decoder.py compares the logits), laid out
for sampling, where the decoder runs on the same prompt cache dozens of times:

- weights are read once (and again only after a parameter changes, `fast.build_decoder`): LoRA deltas are folded into copies of the adapted linears (the model is
  untouched), q/k/v and the dense MLP's gate/up become one matmul each, and the weights are cast once to the
  matmul dtype (`decoder_dtype`: the model's own by default; "bfloat16", or "fast" = bf16 on CPUs with
  AVX512-BF16/AMX and GPUs that support it);
- the residual stream, norms, router, softmaxes and logits stay in fp32; only matmul inputs are cast (attention's
  q/k/v too; on CPUs the attention kernel then runs in fp32 on those rounded values, faster than its bf16 path);
- the prompt KV cache is cast once per canvas, rotary tables are computed once per canvas;
- MoE: tokens are sorted by expert once per layer and each expert runs one matmul pair on a contiguous slice
  (transformers loops with boolean masks and advanced indexing);
- no attention-mask objects, no output dataclasses, no hooks.

Memory: the fused q/k/v and gate/up weights (and LoRA-folded linears) are copies, i.e. one extra copy of the
decoder's attention and dense-MLP weights while the sampler is in use (`dgtune.sampling.fast.build_decoder` keeps
it on the model until a parameter changes); `sampler.decoder=transformers` avoids it where memory is tight.

Sliding-window layers attend to whatever the encoder cache holds for them, as transformers' decoder does without a
mask. Unsupported variants (clipped linears, attention soft-capping) raise
`FusedDecoderUnsupported`; `decoder="auto"` then falls back to the transformers decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgtune.diffusion.model_calls import unwrap
from dgtune.diffusion.objective import softcap
from dgtune.models.quant import dense_weight


class FusedDecoderUnsupported(NotImplementedError):
    """The model uses a decoder feature the fused decoder does not implement."""


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 matmuls beat fp32: CUDA with bf16 support, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from dgtune.runtime import cpu_bf16_supported

        return cpu_bf16_supported()
    return False


def resolve_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Matmul dtype for `decoder_dtype`: "auto" = the model's own dtype (same maths as transformers' decoder),
    "bfloat16" / "float32" = that dtype, "fast" = bf16 where bf16 matmuls are fast (`bf16_is_fast`), else auto."""
    if name == "auto":
        return model_dtype
    if name == "fast":
        return torch.bfloat16 if bf16_is_fast(device) else model_dtype
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    raise ValueError(f"decoder_dtype must be auto, fast, float32 or bfloat16, got {name!r}")


def effective_weight(linear) -> torch.Tensor:
    """The weight a (possibly peft-LoRA-wrapped, possibly bitsandbytes-quantised) linear layer applies: base
    (dequantised) + active, unmerged LoRA deltas."""
    if not hasattr(linear, "base_layer"):
        return dense_weight(linear)
    w = dense_weight(linear.get_base_layer())
    if getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return w
    for name in linear.active_adapters:
        if name in getattr(linear, "lora_A", {}):
            w = w + linear.get_delta_weight(name)
        elif name in getattr(linear, "lora_embedding_A", {}) or name in getattr(linear, "lora_magnitude_vector", {}):
            raise FusedDecoderUnsupported(f"adapter {name!r} on {type(linear).__name__} is not a plain LoRA")
    return w


def effective_expert_weights(experts) -> dict[str, torch.Tensor]:
    """The routed experts' 3-D weights {gate_up_proj [E, 2 Ie, H], down_proj [E, H, Ie]} as applied: base + the
    active, unmerged LoRA deltas of peft's `ParamWrapper`s (`lora.experts=true`: one wrapper per parameter, nested)."""
    deltas: dict[str, torch.Tensor] = {}
    module = experts
    while hasattr(module, "base_layer") and hasattr(module, "parameter_name"):  # peft ParamWrapper
        if not (getattr(module, "merged", False) or getattr(module, "disable_adapters", False)):
            for name in module.active_adapters:
                if name in getattr(module, "lora_A", {}):
                    d = module.get_delta_weight(name)
                    deltas[module.parameter_name] = deltas.get(module.parameter_name, 0) + d
        module = module.base_layer
    if hasattr(module, "base_layer"):
        raise FusedDecoderUnsupported(f"adapter {type(module).__name__} on the MoE experts is not a plain LoRA")
    out = {}
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(module, name)
        if type(w).__name__ != "Parameter" and not isinstance(w, torch.Tensor):
            raise FusedDecoderUnsupported(f"experts.{name} is a {type(w).__name__}")
        out[name] = w + deltas[name] if name in deltas else w
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """DiffusionGemma RMSNorm in fp32: x * (mean(x^2) + eps)^-0.5 * weight."""
    x = x.float()
    out = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return out if weight is None else out * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x [b, l, h, d] with cos/sin [1, l, 1, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    w_qkv: torch.Tensor  # [(h + 2 kvh) d or (h + kvh) d, H]
    q_dim: int
    kv_dim: int
    has_v: bool
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    w_o: torch.Tensor
    ln_in: torch.Tensor
    ln_post_attn: torch.Tensor
    ln_pre_ff: torch.Tensor
    ln_post_ff: torch.Tensor
    ln_post_ff1: torch.Tensor
    ln_pre_ff2: torch.Tensor
    ln_post_ff2: torch.Tensor
    w_gate_up: torch.Tensor  # [2 I, H]
    w_down: torch.Tensor  # [H, I]
    router_scale: torch.Tensor  # [H] (fp32)
    router_proj: torch.Tensor  # [E, H] (fp32)
    per_expert_scale: torch.Tensor  # [E] (fp32)
    experts_gate_up: torch.Tensor  # [E, 2 Ie, H]
    experts_down: torch.Tensor  # [E, H, Ie]
    layer_scalar: torch.Tensor
    head_dim: int


class FusedDecoder:
    """DiffusionGemma's decoder + LM head as plain tensor code, weights snapshotted from `model` at construction."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        core = unwrap(model)
        dec = core.model.decoder
        tc = core.config.text_config
        if getattr(tc, "use_clipped_linears", False):
            raise FusedDecoderUnsupported("clipped linears")
        if getattr(tc, "attn_logit_softcapping", None) is not None:
            raise FusedDecoderUnsupported("attention logit soft-capping")
        self.layer_types = list(tc.layer_types[: tc.num_hidden_layers])
        if not set(self.layer_types) <= {"full_attention", "sliding_attention"}:
            raise FusedDecoderUnsupported(f"layer types {sorted(set(self.layer_types))}")
        self.dtype, self.eps, self.top_k = dtype, tc.rms_norm_eps, tc.top_k_experts
        # attention: q/k/v (prompt cache included) are rounded to the matmul dtype, as matmul inputs are; on CPUs
        # the attention kernel then runs on them in fp32 (PyTorch's CPU flash attention is slower in bf16 here)
        on_cpu = dec.embed_tokens.weight.device.type == "cpu"
        self.att_dtype = torch.float32 if on_cpu else dtype
        self.act = dec.layers[0].mlp.act_fn
        self.act_is_gelu_tanh = tc.hidden_activation == "gelu_pytorch_tanh"
        self.final_softcap = tc.final_logit_softcapping
        self.rotary_emb = dec.rotary_emb
        f32 = torch.float32
        with torch.no_grad():
            emb = dec.embed_tokens
            self.embed = emb.weight.detach().to(f32)  # [v, H]
            self.embed_scale = float(emb.scalar_embed_scale)
            sc = dec.self_conditioning
            self.sc_pre = sc.pre_norm.weight.detach().to(f32)
            self.sc_gate_up = torch.cat([effective_weight(sc.gate_proj), effective_weight(sc.up_proj)]).to(dtype)
            self.sc_down = effective_weight(sc.down_proj).detach().to(dtype)
            self.norm = dec.norm.weight.detach().to(f32)
            self.lm_head = effective_weight(core.lm_head).detach().to(dtype)  # [v, H]
            self.layers = [self._layer(layer, dtype) for layer in dec.layers[: tc.num_hidden_layers]]
            # the prompt encoder (`encode_prompt`): same layer maths, causal; sliding windows are not implemented
            enc = core.model.encoder.language_model
            self.can_encode = set(self.layer_types) == {"full_attention"}
            if self.can_encode:
                self.enc_embed = enc.embed_tokens.weight.detach().to(f32)
                self.enc_embed_scale = float(enc.embed_tokens.scalar_embed_scale)
                self.enc_rotary = enc.rotary_emb
                self.enc_layers = [self._layer(layer, dtype) for layer in enc.layers[: tc.num_hidden_layers]]

    @staticmethod
    def _layer(layer, dtype) -> _Layer:
        att, f32 = layer.self_attn, torch.float32
        experts = effective_expert_weights(layer.experts)
        q, k = effective_weight(att.q_proj), effective_weight(att.k_proj)
        parts = [q, k] + ([effective_weight(att.v_proj)] if att.v_proj is not None else [])
        g = layer.router
        return _Layer(
            w_qkv=torch.cat(parts).detach().to(dtype), q_dim=q.shape[0], kv_dim=k.shape[0],
            has_v=att.v_proj is not None, q_norm=att.q_norm.weight.detach().to(f32),
            k_norm=att.k_norm.weight.detach().to(f32), w_o=effective_weight(att.o_proj).detach().to(dtype),
            ln_in=layer.input_layernorm.weight.detach().to(f32),
            ln_post_attn=layer.post_attention_layernorm.weight.detach().to(f32),
            ln_pre_ff=layer.pre_feedforward_layernorm.weight.detach().to(f32),
            ln_post_ff=layer.post_feedforward_layernorm.weight.detach().to(f32),
            ln_post_ff1=layer.post_feedforward_layernorm_1.weight.detach().to(f32),
            ln_pre_ff2=layer.pre_feedforward_layernorm_2.weight.detach().to(f32),
            ln_post_ff2=layer.post_feedforward_layernorm_2.weight.detach().to(f32),
            w_gate_up=torch.cat([effective_weight(layer.mlp.gate_proj), effective_weight(layer.mlp.up_proj)])
            .detach().to(dtype),
            w_down=effective_weight(layer.mlp.down_proj).detach().to(dtype),
            router_scale=(g.scale.detach().to(f32) * g.scalar_root_size),
            router_proj=effective_weight(g.proj).detach().to(f32),
            per_expert_scale=g.per_expert_scale.detach().to(f32),
            experts_gate_up=experts["gate_up_proj"].detach().to(dtype),
            experts_down=experts["down_proj"].detach().to(dtype),
            layer_scalar=layer.layer_scalar.detach().to(f32), head_dim=att.head_dim,
        )

    def compile(self) -> None:
        """torch.compile the decoder (one compile per new shape, then a dynamic-batch one; ~20 s each on a CPU).
        Compiled, tanh-GELU is written as x * sigmoid(2z) (= 0.5 x (1 + tanh z)), which inductor's CPU code
        vectorises about 3x better than tanh; eager keeps the library GELU, the faster one there."""
        if self.act_is_gelu_tanh:
            self.act = gelu_tanh_as_sigmoid
        self.forward = torch.compile(self.forward, dynamic=None)
        self.encode_prompt = torch.compile(self.encode_prompt, dynamic=None)

    def prepare_cache(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The encoder cache's per-layer (keys, values) [b, kvh, p, d], rounded to the matmul dtype, in the
        attention dtype. (Rounding to bf16 also hides the last-bit differences that transformers' fp32 encoder
        shows between batch sizes, which bf16 casts further on would otherwise amplify: batch invariance.)"""
        dt, at = self.dtype, self.att_dtype
        return [(cache.layers[i].keys.to(dt).to(at).contiguous(), cache.layers[i].values.to(dt).to(at).contiguous())
                for i in range(len(self.layers))]  # (contiguous, as index_select returns them: one compiled graph)

    def rope_tables(self, positions: torch.Tensor, rotary=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer type, cos, sin [1, l, 1, d] (fp32) for positions [1, l] (the decoder's rotary embedding, or
        `rotary`)."""
        tables = {}
        for lt in set(self.layer_types):
            cos, sin = (self.rotary_emb if rotary is None else rotary)(self.embed[:1], positions, lt)
            tables[lt] = (cos[:, :, None], sin[:, :, None])
        return tables

    def encode_prompt(self, prompt_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The causal encoder on prompt_ids [b, p] (positions 0..p-1, no padding): per-layer (keys, values)
        [b, kvh, p, d] as `prepare_cache` gives them for transformers' cache (tests/test_fused_decoder.py). The
        last layer stops after its keys and values: nothing reads its output."""
        if not self.can_encode:
            raise FusedDecoderUnsupported("sliding-window layers in the encoder")
        x = F.embedding(prompt_ids, self.enc_embed) * self.enc_embed_scale  # [b, p, H] fp32
        positions = torch.arange(prompt_ids.shape[1], device=prompt_ids.device)[None]
        rope = self.rope_tables(positions, self.enc_rotary)
        kv = []
        for i, (layer, lt) in enumerate(zip(self.enc_layers, self.layer_types)):
            x, k, v = self._block(layer, x, None, None, *rope[lt], kv_only=i == len(self.enc_layers) - 1)
            kv.append((k.contiguous(), v.contiguous()))  # [b, kvh, p, d] (the layout index_select keeps)
        return kv

    def __call__(self, canvas: torch.Tensor, kv: list, rope: dict, sc_logits: torch.Tensor | None) -> torch.Tensor:
        """See `forward`."""
        return self.forward(canvas, kv, rope, sc_logits)

    def forward(self, canvas: torch.Tensor, kv: list, rope: dict, sc_logits: torch.Tensor | None) -> torch.Tensor:
        """Soft-capped fp32 logits [b, l, v] for canvas [b, l] against kv (`prepare_cache`), rope (`rope_tables`)
        and the previous step's self-conditioning logits [b, l, v] (None on the first step)."""
        b, l = canvas.shape
        dt = self.dtype
        x = F.embedding(canvas, self.embed) * self.embed_scale  # [b, l, H] fp32
        if sc_logits is not None:  # soft embeddings of the previous logits, through the self-conditioning MLP
            soft = (sc_logits.float().softmax(-1) @ self.embed) * self.embed_scale
            g, u = F.linear(_rms(soft, self.sc_pre, self.eps).to(dt), self.sc_gate_up).chunk(2, -1)
            x = x + F.linear(self.act(g) * u, self.sc_down).float()
        x = _rms(x, None, self.eps)
        for layer, lt, (pk, pv) in zip(self.layers, self.layer_types, kv):
            x, _, _ = self._block(layer, x, pk, pv, *rope[lt])
        h = _rms(x, self.norm, self.eps)
        return softcap(F.linear(h.to(dt), self.lm_head).float(), self.final_softcap)

    def _block(self, p: _Layer, x, pk, pv, cos, sin, kv_only: bool = False):
        """One layer on x [b, l, H]: attention over the prefix keys / values pk, pv [b, kvh, p, d] and the
        layer's own (None: causal self-attention, the encoder), then dense MLP + MoE. Returns (x, k, v) with this
        layer's keys / values [b, kvh, l, d]; `kv_only` returns (None, k, v) right after computing them."""
        b, l, hidden = x.shape
        d, dt, eps = p.head_dim, self.dtype, self.eps
        qkv = F.linear(_rms(x, p.ln_in, eps).to(dt), p.w_qkv)  # [b, l, q + kv (+ kv)]
        q = qkv[..., : p.q_dim].view(b, l, -1, d)
        k = qkv[..., p.q_dim: p.q_dim + p.kv_dim].view(b, l, -1, d)
        v = qkv[..., p.q_dim + p.kv_dim:].view(b, l, -1, d) if p.has_v else k
        at = self.att_dtype
        v = _rms(v, None, eps).to(dt).to(at).transpose(1, 2)
        k = _rope(_rms(k, p.k_norm, eps), cos, sin).to(dt).to(at).transpose(1, 2)  # [b, kvh, l, d]
        if kv_only:
            return None, k, v
        q = _rope(_rms(q, p.q_norm, eps), cos, sin).to(dt).to(at).transpose(1, 2)  # [b, h, l, d]
        keys, values = (k, v) if pk is None else (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
        att = F.scaled_dot_product_attention(q, keys, values, scale=1.0, is_causal=pk is None,
                                             enable_gqa=keys.shape[1] != q.shape[1])
        att = F.linear(att.transpose(1, 2).reshape(b, l, -1).to(dt), p.w_o)  # [b, l, H]
        x = x + _rms(att, p.ln_post_attn, eps)

        g, u = F.linear(_rms(x, p.ln_pre_ff, eps).to(dt), p.w_gate_up).chunk(2, -1)
        dense = _rms(F.linear(self.act(g) * u, p.w_down), p.ln_post_ff1, eps)
        moe = _rms(self._moe(p, x.view(-1, hidden)).view(b, l, hidden), p.ln_post_ff2, eps)
        x = x + _rms(dense + moe, p.ln_post_ff, eps)
        return x * p.layer_scalar, k, v

    def _route(self, p: _Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router on x [n, H] in fp32: top-k expert weights [n, k] (renormalised, per-expert scaled), ids [n, k]."""
        probs = F.linear(_rms(x, None, self.eps) * p.router_scale, p.router_proj).softmax(-1)  # [n, E]
        w, idx = probs.topk(self.top_k, dim=-1)  # [n, k]
        return (w / w.sum(-1, keepdim=True)) * p.per_expert_scale[idx], idx

    def _moe(self, p: _Layer, x: torch.Tensor) -> torch.Tensor:
        """Top-k MoE on x [n, H] (fp32) -> [n, H] fp32: tokens sorted by expert, each expert's matmuls on its
        contiguous slice (`torch._grouped_mm`, no host sync). Running every expert densely on every token was
        slower even with 4 experts."""
        n, k = x.shape[0], self.top_k
        w, idx = self._route(p, x)
        flat = idx.reshape(-1)  # [n k]
        order = torch.argsort(flat, stable=True)
        token = order // k
        e = p.experts_down.shape[0]
        counts = torch.zeros(e, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))  # [E]
        xs = _rms(x, p.ln_pre_ff2, self.eps).to(self.dtype).index_select(0, token)  # [n k, H], sorted by expert
        g, u = _grouped_linear(xs, p.experts_gate_up, counts).chunk(2, -1)
        ys = _grouped_linear(self.act(g) * u, p.experts_down, counts).float() * w.reshape(-1)[order, None]
        return torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, ys)


def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), as x / (1 + exp(-2z))."""
    z2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)  # 2 z
    return x / (1.0 + torch.exp(-z2))


def _grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [m, in] grouped by expert (counts [E], in order) times their expert's weights [E, out, in]."""
    if hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:  # (fp32 grouped_mm is slower on CPU)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, weights.transpose(1, 2), offs=offs)
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):  # host sync; fp32 or an older torch
        outs.append(F.linear(x[start:start + c], weights[e]))
        start += c
    return torch.cat(outs)
