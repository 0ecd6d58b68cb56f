"""A tiny LLaDA-MoE built in code (`model=llada_moe_tiny`): the architecture of inclusionAI/LLaDA-MoE-7B-A1B at toy
sizes, with the real checkpoint's module names, so that the LLaDA-MoE profile (`dgtune/models/families/llada_moe.py`)
and its LoRA pattern are exercised on a CPU.

LLaDA-MoE is an OLMoE-style mixture of experts with the causal mask removed (its modeling file,
`modeling_lladamoe.py`, as the `dllm` library ships it in `dllm/pipelines/llada/models/`): `LLaDAMoEModelLM` holds
`model` (`LLaDAMoEModel`: `embed_tokens`, `layers.{i}` with `self_attn.{q_proj, k_proj, v_proj, o_proj}` and
`self_attn.{q_norm, k_norm}` (RMSNorm over each head, `qk_layernorm`), `mlp` (`LLaDAMoESparseMoeBlock`: the router
`gate` (a linear), softmax scores, top-k without renormalisation; `experts.{e}.{gate_proj, up_proj, down_proj}`),
`input_layernorm`, `post_attention_layernorm`; then `norm`) and the untied head `lm_head`. Its SDPA attention takes
the mask as given with `is_causal=False`: one stack over [prompt ; answer], read without a shift, as LLaDA's. The real
model loads with `trust_remote_code`; this one is dgtune's own class under its own model type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from dgtune.models.tiny_llada import RMSNorm, build_with_char_tokenizer, rotate
from dgtune.models.tiny_llada2 import LLaDA2MoeMLP as ExpertMLP  # the same SwiGLU names (gate/up/down_proj)
from dgtune.models.tiny_llada2 import DecoderStack, TinyLMHeadModel

# LLaDA-MoE-7B-A1B weight names (one layer shown; experts 0..63), read from the module definitions of
# `modeling_lladamoe.py` (dllm's copy): the test data of the family's LoRA pattern
REAL_WEIGHT_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.0.self_attn.k_norm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate.weight",
    "model.layers.0.mlp.experts.0.gate_proj.weight",
    "model.layers.0.mlp.experts.0.up_proj.weight",
    "model.layers.0.mlp.experts.0.down_proj.weight",
    "model.layers.0.mlp.experts.63.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


class TinyLLaDAMoEConfig(PretrainedConfig):
    """Sizes of the tiny LLaDA-MoE (LLaDA-MoE's own config keys)."""

    model_type = "dgtune_tiny_llada_moe"

    def __init__(self, vocab_size=64, hidden_size=64, expert_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                 rope_theta=10000.0, rms_norm_eps=1e-5, mask_token_id=None, **kw):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.expert_intermediate_size, self.num_hidden_layers = expert_intermediate_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.rope_theta, self.rms_norm_eps, self.mask_token_id = rope_theta, rms_norm_eps, mask_token_id
        kw.setdefault("architectures", ["LLaDAMoEModelLM"])
        super().__init__(**kw)


class LLaDAMoEAttention(nn.Module):
    """Bidirectional grouped-query attention with per-head RMSNorm on q and k (`qk_layernorm`), then rotary."""

    def __init__(self, cfg: TinyLLaDAMoEConfig):
        super().__init__()
        d, self.h, self.kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd, self.theta = d // self.h, cfg.rope_theta
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, positions, mask):
        """x [b, s, d], positions [b, s], mask: SDPA boolean mask ([b, 1, s, s] or [b, 1, 1, s]) or None."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.h, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, -1))


class LLaDAMoESparseMoeBlock(nn.Module):
    """The router `gate` (softmax over experts, top-k, weights not renormalised) and the experts."""

    def __init__(self, cfg: TinyLLaDAMoEConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(cfg.hidden_size, cfg.expert_intermediate_size)
                                     for _ in range(cfg.num_experts))

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [n, d]
        w, idx = F.softmax(self.gate(flat), dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)  # [n, k]
        w = w.to(flat.dtype)
        out = torch.zeros_like(flat)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * w[rows, slot, None])
        return out.view(shape)


class LLaDAMoEDecoderLayer(nn.Module):
    """Pre-norm attention + MoE MLP."""

    def __init__(self, cfg: TinyLLaDAMoEConfig):
        super().__init__()
        self.self_attn, self.mlp = LLaDAMoEAttention(cfg), LLaDAMoESparseMoeBlock(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDAMoEModel(DecoderStack):
    """`model` of the tiny LLaDA-MoE."""

    layer_class = LLaDAMoEDecoderLayer


class LLaDAMoEModelLM(TinyLMHeadModel):
    """The tiny LLaDA-MoE (`TinyLMHeadModel` with LLaDA-MoE's names): position i's logits predict token i."""

    config_class = TinyLLaDAMoEConfig
    stack_class = LLaDAMoEModel
    embedding_name = "embed_tokens"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]


def build_tiny_llada_moe(seed: int = 0, **sizes) -> tuple[LLaDAMoEModelLM, object]:
    """A randomly initialised tiny LLaDA-MoE with the bundled character tokenizer (whose [MASK] it uses)."""
    return build_with_char_tokenizer(TinyLLaDAMoEConfig, LLaDAMoEModelLM, seed, sizes)
