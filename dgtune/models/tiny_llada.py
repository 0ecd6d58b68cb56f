"""A tiny LLaDA built in code (`model=llada_tiny`): the architecture of GSAI-ML/LLaDA-8B-Instruct at toy sizes, with
the real checkpoint's module names, so that the LLaDA family profile (`dgtune/models/families/llada.py`), its LoRA
pattern and its loss are exercised on a CPU.

LLaDA is a Transformer with the causal mask removed (ML-GSAI/LLaDA `GUIDELINES.md`, "Model Architecture"): one
bidirectional stack over prompt + answer, RMSNorm, rotary positions, SwiGLU, no biases, an untied output head.
Module names, as LLaDA-8B-Instruct's `model.safetensors.index.json` lists them (`REAL_WEIGHT_NAMES` below):
`model.transformer.wte`, `model.transformer.blocks.{i}.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm,
ff_proj, up_proj, ff_out}`, `model.transformer.ln_f`, and the head `model.transformer.ff_out` (the same last name as
each block's down projection: the LoRA pattern must tell them apart). Real sizes: hidden 4096, 32 layers, 32 heads,
MLP 12288, vocabulary 126,464, mask id 126,336, RoPE theta 500,000, RMSNorm eps 1e-5. The real model loads with
`trust_remote_code` (its class is not in transformers); this one is dgtune's own class under its own model type, so
registering it cannot capture the real checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

# LLaDA-8B-Instruct weight names (one block shown; blocks 0..31), the test data of the family's LoRA pattern
REAL_WEIGHT_NAMES = (
    "model.transformer.wte.weight",
    "model.transformer.blocks.0.attn_norm.weight",
    "model.transformer.blocks.0.q_proj.weight",
    "model.transformer.blocks.0.k_proj.weight",
    "model.transformer.blocks.0.v_proj.weight",
    "model.transformer.blocks.0.attn_out.weight",
    "model.transformer.blocks.0.ff_norm.weight",
    "model.transformer.blocks.0.ff_proj.weight",
    "model.transformer.blocks.0.up_proj.weight",
    "model.transformer.blocks.0.ff_out.weight",
    "model.transformer.ln_f.weight",
    "model.transformer.ff_out.weight",
)


class TinyLLaDAConfig(PretrainedConfig):
    """Sizes of the tiny LLaDA (LLaDA's own config keys where they exist)."""

    model_type = "dgtune_tiny_llada"

    def __init__(self, vocab_size=64, d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, rope_theta=500000.0,
                 rms_norm_eps=1e-5, mask_token_id=None, max_sequence_length=512, **kw):
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.mlp_hidden_size, self.rope_theta, self.rms_norm_eps = mlp_hidden_size, rope_theta, rms_norm_eps
        self.mask_token_id, self.max_sequence_length = mask_token_id, max_sequence_length
        kw.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(**kw)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [b, h, s, d] at positions [b, s] (half-split pairs)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    ang = positions.float()[:, None, :, None] * inv  # [b, 1, s, d/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional attention + SwiGLU MLP, LLaDA's names."""

    def __init__(self, cfg: TinyLLaDAConfig):
        super().__init__()
        d, m = cfg.d_model, cfg.mlp_hidden_size
        self.n_heads, self.theta = cfg.n_heads, cfg.rope_theta
        self.attn_norm, self.ff_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, m, bias=False), nn.Linear(d, m, bias=False)
        self.ff_out = nn.Linear(m, d, bias=False)

    def forward(self, x, positions, mask):
        """x [b, s, d], positions [b, s], mask [b, s] bool (keys attended) or None."""
        b, s, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, s, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        bias = None if mask is None else mask[:, None, None, :]  # [b, 1, 1, s]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)  # no causal mask
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, s, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDATransformer(nn.Module):
    """`model.transformer`: embedding, blocks, final norm and the untied output head."""

    def __init__(self, cfg: TinyLLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)


class LLaDAModel(nn.Module):
    """`model`: holds `transformer` (LLaDA's nesting)."""

    def __init__(self, cfg: TinyLLaDAConfig):
        super().__init__()
        self.transformer = LLaDATransformer(cfg)


class LLaDAModelLM(PreTrainedModel):
    """The tiny LLaDA: `hidden(input_ids, mask, positions)` -> final-normed hidden states; `forward` -> logits."""

    config_class = TinyLLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: TinyLLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def hidden(self, input_ids, attention_mask=None, position_ids=None):
        """Final-normed hidden states [b, s, d]; attention_mask [b, s] (1 = a key to attend to)."""
        t = self.model.transformer
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x, position_ids, mask)
        return t.ln_f(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        """Logits [b, s, v] (as LLaDA's `model(input_ids=...).logits`)."""
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.model.transformer.ff_out(self.hidden(input_ids, attention_mask,
                                                                                position_ids)))


def build_with_char_tokenizer(config_class, model_class, seed: int, sizes: dict):
    """(model, tokenizer): `model_class` randomly initialised from `seed` at `sizes`, in eval mode, with the bundled
    character tokenizer (its vocabulary and [MASK]); the builder of every tiny one-stack model."""
    from dgtune.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = model_class(config_class(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, **sizes))
    model.eval()
    return model, tokenizer


def build_tiny_llada(seed: int = 0, **sizes) -> tuple[LLaDAModelLM, object]:
    """A randomly initialised tiny LLaDA with the bundled character tokenizer (whose [MASK] it uses)."""
    return build_with_char_tokenizer(TinyLLaDAConfig, LLaDAModelLM, seed, sizes)
