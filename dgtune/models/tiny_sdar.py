"""A tiny SDAR built in code (`model=sdar_tiny`): the architecture of JetAstra/SDAR (SDAR-4B-Chat, SDAR-8B-Chat) at
toy sizes, with the real checkpoints' module names, so that SDAR's family profile (`dgtune/models/families/llada2.py`),
its LoRA pattern, its objective (`objective=sdar`) and the block sampler run on a CPU.

SDAR is Qwen3 with block-causal attention (`training/model/SDAR-4B-Chat/modeling_sdar.py`): `SDARForCausalLM` holds
`model` (`SDARModel`: `embed_tokens`, `layers.{i}` with `self_attn.{q_proj, k_proj, v_proj, o_proj}` and per-head
RMSNorms `self_attn.q_norm` / `self_attn.k_norm` before rotary positions, `mlp.{gate_proj, up_proj, down_proj}`
(SwiGLU), `input_layernorm`, `post_attention_layernorm`; then `norm`) and the untied head `lm_head`; grouped-query
attention. Its attention reads the caller's mask in two forms, by the module's mode, and so does this one:

- eval (`SDARAttention.forward`, the `else` branch): `attention_mask.bool()`, True = attend, into SDPA (its
  `generate.py` passes 1/0 block-causal masks). An additive mask (0 / -inf) would be read backwards.
- training: a flex-attention `BlockMask` (its training branch calls `flex_attention(block_mask=...)`; a tensor there
  fails). FlexAttention has no backward on a CPU, so this one evaluates the BlockMask's `mask_mod` densely and runs
  SDPA: the same attention, the same interface.

The real model loads only with `trust_remote_code` (and flash-attn, which its modeling file imports); this one is
dgtune's own class under its own model type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from dgtune.models.tiny_llada import RMSNorm, build_with_char_tokenizer, rotate
from dgtune.models.tiny_llada2 import LLaDA2MoeMLP as SwiGLU  # the same SwiGLU names (gate/up/down_proj)
from dgtune.models.tiny_llada2 import DecoderStack, TinyLMHeadModel

# SDAR-4B-Chat weight names (layer 0 of 36, and the rest), from `training/model/SDAR-4B-Chat/model.safetensors.index.json`
# of JetAstra/SDAR: the test data of the family's LoRA pattern
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
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.35.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


class TinySDARConfig(PretrainedConfig):
    """Sizes of the tiny SDAR (SDAR's own config keys; `block_size` 4 as SDAR-4B-Chat's config.json)."""

    model_type = "dgtune_tiny_sdar"

    def __init__(self, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=None, block_size=4, rope_theta=10000.0,
                 rms_norm_eps=1e-6, mask_token_id=None, **kw):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim or hidden_size // num_attention_heads
        self.block_size, self.rope_theta, self.rms_norm_eps = block_size, rope_theta, rms_norm_eps
        self.mask_token_id = mask_token_id
        kw.setdefault("architectures", ["SDARForCausalLM"])
        super().__init__(**kw)


def read_mask(attention_mask, training: bool, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The SDPA bool mask [b, 1, q, k] (True = attend) of SDAR's `attention_mask` in the module's mode: a BlockMask
    in training (its `mask_mod` evaluated on the index grid), `attention_mask.bool()` in eval, None as None."""
    if attention_mask is None:
        return None
    b, q, k = shape
    if training:
        if not hasattr(attention_mask, "mask_mod"):
            raise TypeError("SDAR's attention in training mode takes a flex-attention BlockMask (its training branch "
                            f"calls flex_attention(block_mask=...)), got {type(attention_mask).__name__}")
        dev = attention_mask.kv_indices.device
        grid = (torch.arange(b, device=dev)[:, None, None, None], torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev),
                torch.arange(q, device=dev)[None, None, :, None], torch.arange(k, device=dev)[None, None, None, :])
        return attention_mask.mask_mod(*grid).expand(b, 1, q, k)
    mask = attention_mask.bool()
    return mask if mask.dim() == 4 else mask[:, None]  # generate.py passes [1, q, k]


class SDARAttention(nn.Module):
    """Grouped-query attention: q/k/v projections, per-head RMSNorm on q and k, rotary, the caller's mask."""

    def __init__(self, cfg: TinySDARConfig):
        super().__init__()
        d, self.h, self.kv, self.hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, positions, attention_mask):
        """x [b, s, d], positions [b, s], attention_mask: as `read_mask` reads it in this module's mode."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.h, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        mask = read_mask(attention_mask, self.training, (b, s, s))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, -1))


class SDARDecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP."""

    def __init__(self, cfg: TinySDARConfig):
        super().__init__()
        self.self_attn = SDARAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, attention_mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class SDARModel(DecoderStack):
    """`model` of the tiny SDAR (the mask reaches each attention as given, read there by the module's mode)."""

    layer_class = SDARDecoderLayer


class SDARForCausalLM(TinyLMHeadModel):
    """The tiny SDAR (`TinyLMHeadModel` with SDAR's names)."""

    config_class = TinySDARConfig
    stack_class = SDARModel
    embedding_name = "embed_tokens"
    _no_split_modules = ["SDARDecoderLayer"]


def build_tiny_sdar(seed: int = 0, **sizes) -> tuple[SDARForCausalLM, object]:
    """A randomly initialised tiny SDAR with the bundled character tokenizer (whose [MASK] it uses)."""
    return build_with_char_tokenizer(TinySDARConfig, SDARForCausalLM, seed, sizes)
