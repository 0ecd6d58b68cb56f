"""A tiny Dream built in code (`model=dream_tiny`): the architecture of Dream-org/Dream-v0-Instruct-7B at toy sizes,
with the real checkpoint's module names, so that the Dream family profile (`dgtune/models/families/dream.py`), its
LoRA pattern, its shifted logits and its loss are exercised on a CPU.

Dream is Qwen2.5 with the causal mask removed (its modeling code, `modeling_dream.py`, as the `dllm` library ships
it in `dllm/pipelines/dream/models/`): `DreamModel` holds `model` (`DreamBaseModel`: `embed_tokens`, `layers.{i}`
with `self_attn.{q_proj, k_proj, v_proj}` (with biases), `self_attn.o_proj`, `mlp.{gate_proj, up_proj, down_proj}`,
`input_layernorm`, `post_attention_layernorm`; then `norm`) and the untied head `lm_head`; grouped-query attention,
RMSNorm, rotary positions, SDPA with `is_causal=False` hard-coded. Its forward returns unshifted logits: position i's
logits predict token i + 1 (Dream shifts them right by one in training and sampling). Mask id 151,666 and pad id
151,643 (`configuration_dream.py`). The base model takes the attention mask as SDPA's boolean mask (Dream's sampler
passes [b, 1, s, s] or "full"); this one takes the same and a key mask [b, 1, 1, s]. The real model loads with
`trust_remote_code`; this one is dgtune's own class under its own model type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dgtune.models.tiny_llada import RMSNorm, build_with_char_tokenizer, rotate

# Dream-v0-Instruct-7B weight names (one layer shown; layers 0..27), the test data of the family's LoRA pattern
REAL_WEIGHT_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.k_proj.bias",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.v_proj.bias",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


class TinyDreamConfig(PretrainedConfig):
    """Sizes of the tiny Dream (Dream's own config keys)."""

    model_type = "dgtune_tiny_dream"

    def __init__(self, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                 mask_token_id=None, **kw):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.rope_theta, self.rms_norm_eps = num_key_value_heads, rope_theta, rms_norm_eps
        self.mask_token_id = mask_token_id
        kw.setdefault("architectures", ["DreamModel"])
        super().__init__(**kw)


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention with Qwen2's biases on q/k/v."""

    def __init__(self, cfg: TinyDreamConfig):
        super().__init__()
        d, self.h, self.kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd, self.theta = d // self.h, cfg.rope_theta
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=True)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=True)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, positions, mask):
        """x [b, s, d], positions [b, s], mask: SDPA boolean mask ([b, 1, s, s] or [b, 1, 1, s]) or None."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, -1))


class DreamMLP(nn.Module):
    """SwiGLU, Qwen2's names."""

    def __init__(self, cfg: TinyDreamConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, m, bias=False), nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    """Pre-norm attention + MLP."""

    def __init__(self, cfg: TinyDreamConfig):
        super().__init__()
        self.self_attn, self.mlp = DreamAttention(cfg), DreamMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    """`model`: embedding, layers, final norm; `forward` returns (final-normed hidden states [b, s, d],) as the real
    `DreamBaseModel` does with `return_dict=False`."""

    def __init__(self, cfg: TinyDreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None  # "full": no mask
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids, mask)
        return (self.norm(x),)


class DreamModel(PreTrainedModel):
    """The tiny Dream: `model(input_ids, attention_mask, position_ids)` -> (hidden,); `forward` -> unshifted logits."""

    config_class = TinyDreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]

    def __init__(self, config: TinyDreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:  # random, so that the q/k/v biases count
            nn.init.normal_(module.bias, std=0.02)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        """Logits [b, s, v], unshifted (as Dream's `model(x, attention_mask, tok_idx).logits`)."""
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask, position_ids)[0]))


def build_tiny_dream(seed: int = 0, **sizes) -> tuple[DreamModel, object]:
    """A randomly initialised tiny Dream with the bundled character tokenizer (whose [MASK] it uses)."""
    return build_with_char_tokenizer(TinyDreamConfig, DreamModel, seed, sizes)
