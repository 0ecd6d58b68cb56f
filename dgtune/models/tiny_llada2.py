"""A tiny LLaDA2 built in code (`model=llada2_tiny`): the architecture of inclusionAI/LLaDA2.0-mini at toy sizes,
with the real checkpoint's module names, so that the block-diffusion family profile
(`dgtune/models/families/llada2.py`), its LoRA pattern, its [x_t ; x_0] training layout and its block sampler are
exercised on a CPU.

LLaDA2.0 is a mixture-of-experts Transformer whose attention is whatever 4-D mask the caller passes (its modeling
file, `modeling_llada2_moe.py`, as dFactory's `models/llada2_moe/` and the `dllm` library's
`dllm/pipelines/llada2/models/` ship it; its training and its own `generate()` pass block-causal masks):
`LLaDA2MoeModelLM` holds `model` (`LLaDA2MoeModel`: `word_embeddings`, `layers.{i}` with
`attention.query_key_value` (one fused q/k/v linear), `attention.query_layernorm` / `attention.key_layernorm`
(RMSNorm over each head, `use_qk_norm`), `attention.dense`; then a dense SwiGLU `mlp.{gate_proj, up_proj,
down_proj}` for the first `first_k_dense_replace` layers and a sparse MoE for the rest (`mlp.gate` with its `weight`
and `expert_bias`: sigmoid scores, top-k chosen on score + bias, weights renormalised and scaled by
`routed_scaling_factor`; `mlp.experts.{e}.{gate_proj, up_proj, down_proj}`; `mlp.shared_experts.{...}`);
`input_layernorm`, `post_attention_layernorm`; then `norm`) and the untied head `lm_head`. Grouped-query attention,
rotary positions. Simplified here: full instead of partial (0.5) rotary dimensions and no expert groups
(`n_group` 1). A 4-D mask (bool, or additive float) is used as it is; a 2-D mask [b, s] is a key-padding mask over
bidirectional attention. The real model loads with `trust_remote_code`; this one is dgtune's own class under its own
model type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dgtune.models.tiny_llada import RMSNorm, build_with_char_tokenizer, rotate

# LLaDA2.0-mini weight names (layer 0 is dense, `first_k_dense_replace` 1; layer 1 is MoE, experts 0..255), read from
# the module definitions of `modeling_llada2_moe.py` (dllm's copy, `dllm/pipelines/llada2/models/`): the test data
# of the family's LoRA pattern
REAL_WEIGHT_NAMES = (
    "model.word_embeddings.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.attention.query_key_value.weight",
    "model.layers.0.attention.query_layernorm.weight",
    "model.layers.0.attention.key_layernorm.weight",
    "model.layers.0.attention.dense.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.attention.query_key_value.weight",
    "model.layers.1.attention.dense.weight",
    "model.layers.1.mlp.gate.weight",
    "model.layers.1.mlp.gate.expert_bias",
    "model.layers.1.mlp.experts.0.gate_proj.weight",
    "model.layers.1.mlp.experts.0.up_proj.weight",
    "model.layers.1.mlp.experts.0.down_proj.weight",
    "model.layers.1.mlp.experts.255.down_proj.weight",
    "model.layers.1.mlp.shared_experts.gate_proj.weight",
    "model.layers.1.mlp.shared_experts.up_proj.weight",
    "model.layers.1.mlp.shared_experts.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


class TinyLLaDA2Config(PretrainedConfig):
    """Sizes of the tiny LLaDA2 (LLaDA2's own config keys)."""

    model_type = "dgtune_tiny_llada2"

    def __init__(self, vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                 num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                 rope_theta=10000.0, rms_norm_eps=1e-6, mask_token_id=None, **kw):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.moe_intermediate_size, self.num_hidden_layers = moe_intermediate_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.num_shared_experts, self.first_k_dense_replace = num_shared_experts, first_k_dense_replace
        self.routed_scaling_factor, self.rope_theta, self.rms_norm_eps = routed_scaling_factor, rope_theta, rms_norm_eps
        self.mask_token_id = mask_token_id
        kw.setdefault("architectures", ["LLaDA2MoeModelLM"])
        super().__init__(**kw)


class LLaDA2MoeAttention(nn.Module):
    """Grouped-query attention under the caller's mask: fused q/k/v, per-head RMSNorm on q and k, then rotary."""

    def __init__(self, cfg: TinyLLaDA2Config):
        super().__init__()
        d, self.h, self.kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd, self.theta = d // self.h, cfg.rope_theta
        self.query_key_value = nn.Linear(d, (self.h + 2 * self.kv) * self.hd, bias=False)
        self.query_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.dense = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, positions, mask):
        """x [b, s, d], positions [b, s], mask: SDPA mask [b, 1, s, s] (bool or additive) or None."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.h + 2 * self.kv, self.hd)
        q, k, v = qkv.split([self.h, self.kv, self.kv], dim=2)
        q, k, v = self.query_layernorm(q).transpose(1, 2), self.key_layernorm(k).transpose(1, 2), v.transpose(1, 2)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.dense(a.transpose(1, 2).reshape(b, s, -1))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU (the dense layers, each expert and the shared expert)."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, m, bias=False), nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """The router: sigmoid scores; top-k chosen on score + `expert_bias`; the chosen scores renormalised and scaled."""

    def __init__(self, cfg: TinyLLaDA2Config):
        super().__init__()
        self.top_k, self.scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x):
        """x [n, d] -> (expert ids [n, k], weights [n, k])."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [n, e]
        idx = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # [n, k]
        w = scores.gather(1, idx)
        return idx, (w / (w.sum(-1, keepdim=True) + 1e-20) * self.scale).to(x.dtype)


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (a loop over the experts that any token chose) plus the shared expert."""

    def __init__(self, cfg: TinyLLaDA2Config):
        super().__init__()
        d, m = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = LLaDA2MoeGate(cfg)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(d, m) for _ in range(cfg.num_experts))
        self.shared_experts = LLaDA2MoeMLP(d, m * cfg.num_shared_experts)

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [n, d]
        idx, w = self.gate(flat)  # [n, k]
        out = torch.zeros_like(flat)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * w[rows, slot, None])
        return (out + self.shared_experts(flat)).view(shape)


class LLaDA2MoeDecoderLayer(nn.Module):
    """Pre-norm attention + (dense or MoE) MLP."""

    def __init__(self, cfg: TinyLLaDA2Config, index: int):
        super().__init__()
        self.attention = LLaDA2MoeAttention(cfg)
        dense = index < cfg.first_k_dense_replace
        self.mlp = LLaDA2MoeMLP(cfg.hidden_size, cfg.intermediate_size) if dense else LLaDA2MoeSparseMoeBlock(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, mask):
        x = x + self.attention(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def sdpa_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The SDPA mask of LLaDA2's `attention_mask`: a 4-D bool or additive mask as it is (in the hidden dtype), a
    2-D key mask [b, s] as [b, 1, 1, s] bool, None as None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()[:, None, None, :]
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(dtype)


class LLaDA2MoeModel(nn.Module):
    """`model`: embedding, layers, final norm; `forward` returns (final-normed hidden states [b, s, d],)."""

    def __init__(self, cfg: TinyLLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        x = self.word_embeddings(input_ids)
        mask = sdpa_mask(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, position_ids, mask)
        return (self.norm(x),)


class DecoderStack(nn.Module):
    """`model` with the Llama / Qwen names: `embed_tokens`, `layers` (each a `layer_class(cfg)`, called as
    `layer(x, positions, attention_mask)` with the mask as given), `norm`; `forward` returns (final-normed hidden
    states [b, s, d],) as the real models do with `return_dict=False`. A family's stack sets `layer_class`."""

    layer_class: type = nn.Module

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids, attention_mask)
        return (self.norm(x),)


class TinyLMHeadModel(PreTrainedModel):
    """A tiny model built in code: `model` (the family's stack, `stack_class`, returning (final hidden states,)) and an
    untied head `lm_head`; `forward(input_ids, attention_mask, position_ids)` -> output with `.logits` [b, s, v], the
    call the families' own samplers and trainers make. A family's tiny model subclasses it with its names."""

    base_model_prefix = "model"
    stack_class: type = nn.Module
    embedding_name: str = ""  # the stack's token embedding

    def __init__(self, config):
        super().__init__(config)
        self.model = self.stack_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self):
        return getattr(self.model, self.embedding_name)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        """Logits [b, s, v]: position i's own (no shift)."""
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask, position_ids)[0]))


class LLaDA2MoeModelLM(TinyLMHeadModel):
    """The tiny LLaDA2 (`TinyLMHeadModel` with LLaDA2's names)."""

    config_class = TinyLLaDA2Config
    stack_class = LLaDA2MoeModel
    embedding_name = "word_embeddings"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]


def build_tiny_llada2(seed: int = 0, **sizes) -> tuple[LLaDA2MoeModelLM, object]:
    """A randomly initialised tiny LLaDA2 with the bundled character tokenizer (whose [MASK] it uses)."""
    return build_with_char_tokenizer(TinyLLaDA2Config, LLaDA2MoeModelLM, seed, sizes)
