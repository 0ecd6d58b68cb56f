"""Analytic peak training memory per GPU of a dgtune LoRA step on a DiffusionGemma (no model is built).

Parameters are counted exactly from the text config (`parameter_counts`, checked against `sum(p.numel())` in
tests/test_memory_plan.py; the vision tower is not counted). Memory = weights (sharded over `gpus` with FSDP2, plus
one gathered layer; with `trainer.strategy=fsdp2` the tied layer weights twice under LoRA and, on the main process,
an unsharded replica) + LoRA params, fp32 grads and AdamW's two fp32 states (sharded; every parameter's in a full
fine-tune) +
activations saved for backward (not sharded) + logits. Activations are counted per token and layer from the
tensors autograd keeps (`saved_elements_per_token`; `act_scale` can rescale them, 1 = as derived); one fixed
`overhead` (eval/bench/memory_plan.py fits it on one measured CPU setting and checks the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# configs/lora/default.yaml: q/k/v/o and the dense MLP of encoder and decoder layers (v_proj: sliding layers only)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIB = 2**20


@dataclass
class TextShape:
    """The sizes of a `DiffusionGemmaTextConfig` that memory depends on."""

    vocab_size: int
    hidden_size: int
    layer_types: list[str]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_global_key_value_heads: int
    global_head_dim: int
    intermediate_size: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int

    @classmethod
    def from_config(cls, text) -> "TextShape":
        """Read the fields from a `DiffusionGemmaTextConfig` (per-layer attention sizes from `per_layer_config`)."""
        kinds = list(text.layer_types)
        per = getattr(text, "per_layer_config", None)
        attn = {}
        for kind in ("sliding_attention", "full_attention"):
            if kind in kinds and per is not None:
                layer = per[kinds.index(kind)]
                attn[kind] = (layer.num_key_value_heads, layer.head_dim)
        simple = {f: getattr(text, f) for f in cls.__dataclass_fields__
                  if f not in ("num_key_value_heads", "head_dim", "num_global_key_value_heads", "global_head_dim")}
        sliding = attn.get("sliding_attention") or (text.num_key_value_heads, text.head_dim)
        full = attn.get("full_attention") or (text.num_global_key_value_heads, text.global_head_dim)
        return cls(**simple, num_key_value_heads=sliding[0], head_dim=sliding[1],
                   num_global_key_value_heads=full[0], global_head_dim=full[1])

    def attention(self, kind: str) -> tuple[int, int, bool]:
        """(kv heads, head dim, has v_proj) of a layer type: full layers use the global sizes and keys as values."""
        if kind == "full_attention":
            return self.num_global_key_value_heads, self.global_head_dim, False
        return self.num_key_value_heads, self.head_dim, True


def linear_shapes(shape: TextShape, kind: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the attention and dense-MLP nn.Linear modules of one layer of type `kind` (LoRA's targets)."""
    d, h, i = shape.hidden_size, shape.num_attention_heads, shape.intermediate_size
    kv, hd, has_v = shape.attention(kind)
    out = {"q_proj": (d, h * hd), "k_proj": (d, kv * hd), "o_proj": (h * hd, d),
           "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    if has_v:
        out["v_proj"] = (d, kv * hd)
    return out


def parameter_counts(shape: TextShape) -> dict[str, int]:
    """Exact parameter counts of the text model by group (encoder and decoder layers share all weights; the LM head
    is tied to the embedding; the decoder's self-conditioning MLP is its own). Vision tower not included."""
    d, e = shape.hidden_size, shape.num_experts
    c = dict.fromkeys(["embedding", "attention", "dense_mlp", "router", "experts", "norms", "self_conditioning"], 0)
    c["embedding"] = shape.vocab_size * d
    for kind in shape.layer_types:
        lin = linear_shapes(shape, kind)
        _, hd, _ = shape.attention(kind)
        c["attention"] += sum(a * b for n, (a, b) in lin.items() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
        c["dense_mlp"] += sum(a * b for n, (a, b) in lin.items() if n in ("gate_proj", "up_proj", "down_proj"))
        c["norms"] += 7 * d + 2 * hd  # 7 layer norms with scale, q_norm, k_norm (v_norm has none)
        c["router"] += d * e + d + e  # proj, scale, per_expert_scale
        c["experts"] += 3 * e * d * shape.moe_intermediate_size  # gate_up [e, 2 mi, d] + down [e, d, mi]
    c["norms"] += d  # final norm (shared)
    c["self_conditioning"] = 3 * d * shape.intermediate_size + d  # gate/up/down + pre_norm
    return c


def linear_parameters(shape: TextShape) -> int:
    """Parameters in nn.Linear modules of the text model (attention, dense MLP, router proj, self-conditioning MLP):
    what bitsandbytes could quantise; experts are 3-D nn.Parameters, embedding/LM head and norms are not Linear."""
    c = parameter_counts(shape)
    return c["attention"] + c["dense_mlp"] + shape.hidden_size * shape.num_experts * len(shape.layer_types) \
        + c["self_conditioning"] - shape.hidden_size


def lora_parameters(shape: TextShape, r: int, targets=DEFAULT_TARGETS) -> int:
    """LoRA parameters r (in + out) per targeted linear, for the encoder AND the decoder (each its own adapter)."""
    return 2 * sum(r * (a + b) for kind in shape.layer_types
                   for n, (a, b) in linear_shapes(shape, kind).items() if n in targets)


def expert_lora_parameters(shape: TextShape, r: int) -> int:
    """LoRA parameters of `lora.experts=true` (peft `target_parameters`, encoder and decoder each their own): per
    expert and layer r (in + out) for gate_up_proj [2 Ie, H] and down_proj [H, Ie]."""
    d, mi = shape.hidden_size, shape.moe_intermediate_size
    return 2 * len(shape.layer_types) * shape.num_experts * r * ((d + 2 * mi) + (mi + d))


def layer_parameters(shape: TextShape) -> int:
    """Parameters of the layers that encoder and decoder share (everything but embedding and self-conditioning)."""
    c = parameter_counts(shape)
    return c["attention"] + c["dense_mlp"] + c["router"] + c["experts"] + c["norms"]


def saved_elements_per_token(shape: TextShape, kind: str, r: int, targets=DEFAULT_TARGETS,
                             act_bytes: int = 2) -> float:
    """Elements autograd keeps per token for one layer of type `kind` (frozen base, LoRA on `targets`).

    Attention: q through q_norm, RoPE (input, rotate_half), SDPA (q, out) = 5 h hd; k the same and v through v_norm
    = 6 kv hd (cache included); the o_proj input h hd. Dense MLP: gate, GELU output, up, product = 4 i. Experts
    (weights frozen, so grouped_mm keeps no input): per routed copy gate_up output 2 mi, GELU output mi, the
    weighted output d = top_k (3 mi + d); router probabilities e in float32. Hidden-size tensors (residual, the 9
    norm inputs/outputs, o_proj / down outputs, sums) ~ 14 d. LoRA: the rank-r output of each adapter's A.
    """
    d, h, i = shape.hidden_size, shape.num_attention_heads, shape.intermediate_size
    kv, hd, _ = shape.attention(kind)
    lora = r * sum(1 for n in linear_shapes(shape, kind) if n in targets)
    experts = shape.top_k_experts * (3 * shape.moe_intermediate_size + d)
    router = shape.num_experts * 4 / act_bytes
    return 14 * d + 6 * h * hd + 6 * kv * hd + 4 * i + experts + router + lora


@dataclass
class TrainSettings:
    """One training configuration (dgtune's released objective: self-conditioning pass + AR co-loss)."""

    batch: int
    prompt: int
    canvas: int
    lora_r: int = 16
    targets: tuple = DEFAULT_TARGETS
    gradient_checkpointing: bool = False
    loss_chunk: int = 0
    weight_bytes: float = 2.0  # bf16; 4 for fp32; use `four_bit_weight_bytes` for NF4
    act_bytes: int = 2  # bf16 autocast; 4 in fp32
    gpus: int = 1  # FSDP / ZeRO-3: weights, grads and optimizer states sharded over this many
    lora_experts: bool = False  # lora.experts=true: LoRA on the routed experts too
    full_finetune: bool = False  # lora=none: every parameter trains (grads + AdamW states for all, sharded)
    fsdp2_eval: bool = False  # trainer.strategy=fsdp2, the main process while it evaluates: + the unsharded replica
    fsdp2_untied: bool = False  # trainer.strategy=fsdp2 with LoRA: the tied layer weights held twice (sharded)
    extra: dict = field(default_factory=dict)


def predict_memory(shape: TextShape, st: TrainSettings, act_scale: float = 1.0,
                   weight_bytes_total: float | None = None, overhead: float = 0.0) -> dict[str, float]:
    """Predicted peak memory (bytes) per GPU by part: weights, lora (params + fp32 grads + AdamW fp32 m, v),
    activations (saved for backward, not sharded), logits (float32 LM-head logits and their transients), total.

    Tokens: the encoder reads b (prompt + canvas) tokens, the decoder b canvas tokens twice (the self-conditioning
    pass without grad: only its logits, or with loss_chunk its [b, l, d] soft embeddings, survive). Plain path
    (loss_chunk=0): per row of V float32 logits, the tanh and log-softmax outputs are kept (2 V) for the canvas and
    the encoder, the self-conditioning logits (V per canvas row) live through the forward, and the last loss adds
    2 V per encoder row transiently. Chunked: 3 chunk x V float32 transients + the stored hidden-state gradients.
    Gradient checkpointing: each layer keeps its input and the encoder's K/V cache, plus one layer's activations
    during its replay. `weight_bytes_total` overrides weights (e.g. a 4-bit mix); `overhead` (bytes) is a fixed
    runtime cost (allocator, autograd / BLAS workspaces; on a GPU the CUDA context) added to the total."""
    b, l = st.batch, st.canvas
    s = st.prompt + st.canvas
    d, v, a = shape.hidden_size, shape.vocab_size, st.act_bytes
    counts = parameter_counts(shape)
    n_params = sum(counts.values())
    weights = (n_params * st.weight_bytes if weight_bytes_total is None else weight_bytes_total)
    largest_layer = max(sum(x * y for x, y in linear_shapes(shape, k).values()) for k in shape.layer_types) \
        + counts["experts"] / len(shape.layer_types)
    full = weights
    if st.fsdp2_untied:  # dgtune.sharded.untie_frozen_shared: the decoder layers' own copies
        weights = weights + layer_parameters(shape) * st.weight_bytes
    weights = weights / st.gpus
    # sharded: one layer unit gathered + the next prefetched, and the root unit (embedding / LM head,
    # self-conditioning MLP) gathered for the whole step
    gathered = (2 * largest_layer + counts["embedding"] + counts["self_conditioning"]) * st.weight_bytes \
        if st.gpus > 1 else 0.0
    weights += gathered
    n_lora = lora_parameters(shape, st.lora_r, st.targets)
    if st.lora_experts:
        n_lora += expert_lora_parameters(shape, st.lora_r)
    lora_params, lora_states = n_lora * a / st.gpus, n_lora * (4 + 8) / st.gpus  # fp32 grads + AdamW m, v
    if st.full_finetune:  # no adapter: fp32 grads + AdamW m, v of every (sharded) parameter
        lora_params, lora_states = 0.0, n_params * (4 + 8) / st.gpus
    tokens = b * s + b * l  # encoder + graded decoder pass
    per_layer = [saved_elements_per_token(shape, k, st.lora_r, st.targets, a) for k in shape.layer_types]
    cache = sum(2 * shape.attention(k)[0] * shape.attention(k)[1] for k in shape.layer_types) * b * s * a
    if st.gradient_checkpointing:
        acts = tokens * len(shape.layer_types) * d * a + cache + act_scale * max(per_layer) * b * s * a
    else:
        acts = act_scale * tokens * sum(per_layer) * a
    if st.loss_chunk:
        logits = 3 * min(st.loss_chunk, b * s) * v * 4 + (b * s + 2 * b * l) * d * a
    else:
        logits = (2 * b * l + 2 * b * s + b * l + 2 * b * s) * v * 4
    if st.fsdp2_eval:  # sampling with the replica (its activations are not modelled), no training step in flight
        weights, acts, logits = weights - gathered + full, 0.0, 0.0
    total = weights + lora_params + lora_states + acts + logits + overhead
    return {"weights": weights, "lora_params": lora_params, "lora_states": lora_states, "activations": acts,
            "logits": logits, "overhead": overhead, "total": total}


def quantised_parameters(shape: TextShape) -> int:
    """Text-model parameters dgtune's 4-bit / 8-bit load quantises (`dgtune.models.quant.SKIP_MODULES`): every
    nn.Linear except the router projections (skipped) and the LM head (tied to the embedding)."""
    return linear_parameters(shape) - shape.hidden_size * shape.num_experts * len(shape.layer_types)


def four_bit_weight_bytes(shape: TextShape, quantised_linear: bool = True) -> float:
    """Weight bytes with bitsandbytes NF4 (0.5 B + fp32 absmax per 64 = 0.5625 B/param; double quant would make it
    ~0.53) on the `quantised_parameters`, the experts (3-D nn.Parameters), embedding/LM head, routers and norms in
    bf16. quantised_linear=False: transformers' default skip list (every tied key, i.e. every encoder/decoder layer
    weight) leaves the layer linears bf16 too (only the self-conditioning gate/up would be quantised; ignored)."""
    n = sum(parameter_counts(shape).values())
    q = quantised_parameters(shape) if quantised_linear else 0
    return q * 0.5625 + (n - q) * 2.0
