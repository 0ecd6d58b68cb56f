"""Block diffusion (inclusionAI/LLaDA2.0-mini and its kin; JetAstra/SDAR): the family profiles and their model calls.

A block-diffusion model is one Transformer over the whole sequence whose attention is block-causal: the sequence is
cut into blocks of `block_size` tokens at absolute positions from 0 (so the prompt's tail shares a block with the
first answer tokens), each token attends to its own block and to every earlier one. It denoises one block at a time
(`dgtune.sampling.block`, LLaDA2's block refinement) and is trained on every block at once by the [x_t ; x_0] layout
(BD3-LM, Arriola et al. 2025; dFactory `tasks/train_llada2_bd.py` `block_diffusion_mask`): the noisy copy x_t and the
clean copy x_0 side by side, both at positions 0 .. n - 1; a noisy token attends to its own noisy block and to the
clean blocks before it, a clean token to the clean blocks up to its own. `decode_hidden` builds that layout when the
loss passes the clean canvas (`clean_canvas`) and the plain block-causal one when the sampler does not.

Facts (cite what the code uses):
- names and sizes: `dgtune/models/tiny_llada2.py` (LLaDA2.0-mini's module names; the checkpoint's [MASK] is 156,895,
  its EOS 156,892: `generate()`'s defaults); `dgtune/models/tiny_sdar.py` (SDAR-4B-Chat's, Qwen3's names);
- LoRA: the fused q/k/v `attention.query_key_value`, `attention.dense`, the dense first layer's SwiGLU MLP and the
  shared expert; the router `mlp.gate` (whose name is a prefix of `mlp.gate_proj`'s) and the 256 routed experts stay
  frozen, as unsloth's LLaDA2 profile does; anchored at `model.layers.N.` so that `lm_head` is never adapted;
- block size: the model config's `block_size` if it has one, else 32 (dFactory `configs/sft/llada2_mini_bd_sft.yaml`
  and LLaDA2's `generate(block_length=32)`); SDAR's is 4 (its model card);
- noise and loss: `objective.kind=llada2` and `objective.kind=sdar` (`dgtune.diffusion.objective`);
- the attention mask each modeling file reads (`MASK_FORM`): LLaDA2's additive, SDAR's bool in eval and a
  flex-attention BlockMask in training (`mask_argument`).
The real checkpoints load only with `model.trust_remote_code=true` (their class is not in transformers).
"""

from __future__ import annotations

import torch

from dgtune.diffusion.model_calls import unwrap
from dgtune.models.families.dream import (  # noqa: F401 (the transformers-layout calls it shares with Dream)
    encoder_layers, lm_head_weight, lm_logits, vocab_size)
from dgtune.models.family import ModelFamily, register_family
from dgtune.models.families.one_stack import (  # noqa: F401 (calls this family shares: model_calls reads them here)
    PromptCache, decoder_context, encode, has_sliding_layers, no_self_conditioning, training_cache)

__all__ = ["LLADA2", "SDAR", "PromptCache", "encode", "training_cache", "decoder_context", "decode_hidden",
           "window_hidden", "mask_argument", "lm_logits", "lm_head_weight", "self_conditioning_embeddings", "has_sliding_layers",
           "embedding_dtype", "vocab_size", "encoder_layers", "block_size", "block_causal_mask"]

LLADA2 = register_family(ModelFamily(
    name="llada2",
    architectures=("LLaDA2MoeModelLM",),
    model_types=("llada2_moe", "dgtune_tiny_llada2"),
    model_class="AutoModelForCausalLM",
    lora_target_modules=r"model\.layers\.\d+\.(attention\.(query_key_value|dense)"
                        r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))",
    router_param="mlp.gate.",  # the router's weight (and its expert_bias buffer); not mlp.gate_proj
    quant_skip_modules=("mlp.gate", "lm_head"),
    noise="mask",
    remote_code=True,  # LLaDA2MoeModelLM is not a transformers class: its modeling file ships with the checkpoint
    block_diffusion=True,
    mask_token_id=156895,  # LLaDA2's generate(mask_id=156895)
    calls=__name__,
    shard_units=("LLaDA2MoeDecoderLayer",),  # FSDP2 units (modeling_llada2_moe.py `_no_split_modules`)
))

SDAR = register_family(ModelFamily(  # JetAstra/SDAR: Qwen3's names, block-causal attention, block 4
    name="sdar",
    architectures=("SDARForCausalLM",),
    model_types=("sdar", "dgtune_tiny_sdar"),
    model_class="AutoModelForCausalLM",
    lora_target_modules=r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    noise="mask",
    remote_code=True,
    block_diffusion=True,
    mask_token_id=151669,  # SDAR's <|MASK|> (as unsloth's SDAR profile records it)
    calls=__name__,
    shard_units=("SDARDecoderLayer",),  # FSDP2 units (modeling_sdar.py `_no_split_modules`)
))

DEFAULT_BLOCK = {"llada2": 32, "sdar": 4}
# How each family's modeling code reads a 4-D attention mask: LLaDA2's adds it to the scores (0 / -inf); SDAR's
# attention takes `attention_mask.bool()` (True = attend) in eval and a flex-attention BlockMask in training
# (JetAstra/SDAR modeling_sdar.py `SDARAttention.forward`), where an additive mask would be read backwards.
MASK_FORM = {"llada2": "additive", "sdar": "bool_or_block_mask"}


def block_size(model) -> int:
    """The block length: the model config's `block_size`, else the family's published one."""
    from dgtune.models.family import family_of

    core = unwrap(model)
    return int(getattr(core.config, "block_size", None) or DEFAULT_BLOCK[family_of(core).name])


def block_causal_mask(width: int, block: int, device, clean_copy: bool = False) -> torch.Tensor:
    """Bool attention mask (True = attend) over `width` positions in blocks of `block` from position 0: query i sees
    key j iff block(j) <= block(i). With `clean_copy`, the [x_t ; x_0] mask over 2 width positions (BD3-LM's, as
    dFactory's `block_diffusion_mask`): x_t block k sees x_t block k and x_0 blocks < k; x_0 block k sees x_0 blocks
    <= k. [w, w] or [2w, 2w]"""
    blk = torch.arange(width, device=device) // block  # [w]
    causal = blk[None, :] <= blk[:, None]  # [w, w] query row, key column
    if not clean_copy:
        return causal
    same = blk[None, :] == blk[:, None]
    earlier = blk[None, :] < blk[:, None]
    top = torch.cat([same, earlier], dim=1)  # x_t queries: own noisy block, earlier clean blocks
    bottom = torch.cat([torch.zeros_like(same), causal], dim=1)  # x_0 queries: clean blocks up to their own
    return torch.cat([top, bottom], dim=0)


def window_hidden(model, x: torch.Tensor, key_mask: torch.Tensor, clean: torch.Tensor | None = None) -> torch.Tensor:
    """Final-normed hidden states of a window x [b, w] (positions 0 .. w - 1, blocks from 0) under the block-causal
    mask, keys limited to `key_mask` [b, w] (1 = a real token). With `clean` [b, w] (training) the model reads
    [x ; clean] under the [x_t ; x_0] mask and the states of the x half come back. [b, w, d]"""
    core = unwrap(model)
    b, w = x.shape
    allowed = block_causal_mask(w, block_size(core), x.device, clean_copy=clean is not None)  # [w', w']
    keys = key_mask.bool() if clean is None else torch.cat([key_mask, key_mask], dim=1).bool()  # [b, w']
    ids = x if clean is None else torch.cat([x, clean], dim=1)
    eye = torch.eye(ids.shape[1], dtype=torch.bool, device=x.device)  # a padding query keeps itself: no empty row
    allowed = (allowed[None] & keys[:, None, :]) | eye[None]  # [b, w', w']
    pos = torch.arange(w, device=x.device)
    pos = (pos if clean is None else torch.cat([pos, pos]))[None].expand(b, -1)
    out = core.model(input_ids=ids, attention_mask=mask_argument(core, allowed), position_ids=pos, return_dict=False)
    return out[0][:, :w]


def mask_argument(core, allowed: torch.Tensor):
    """`allowed` [b, q, k] (True = attend) in the form the family's modeling code reads (`MASK_FORM`): additive
    [b, 1, q, k] in the embedding dtype; or bool [b, 1, q, k] in eval and a flex-attention BlockMask in training."""
    from dgtune.models.family import family_of

    if MASK_FORM[family_of(core).name] == "additive":
        dtype = core.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))[:, None]
    if not core.training:
        return allowed[:, None]
    from torch.nn.attention.flex_attention import create_block_mask

    b, q, k = allowed.shape
    return create_block_mask(lambda bi, hi, qi, ki: allowed[bi, qi, ki], B=b, H=None, Q_LEN=q, KV_LEN=k,
                             device=allowed.device)


def decode_hidden(model, canvas: torch.Tensor, cache: PromptCache, self_conditioning_logits=None,
                  self_conditioning_mask=None, decoder_attention_mask=None, decoder_position_ids=None,
                  self_conditioning_embeddings=None, clean_canvas: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states [b, l, d] that predict canvas [b, l] placed right after each row's prompt (positions p .. p + l
    - 1, padding after it masked as keys): block-causal, or with `clean_canvas` [b, l] (training) the [x_t ; x_0]
    layout, each block seeing the clean blocks before it."""
    if self_conditioning_logits is not None or self_conditioning_embeddings is not None:
        raise no_self_conditioning("block-diffusion", "llada2")
    b, l = canvas.shape
    prompt, prompt_mask = cache.input_ids, cache.attention_mask
    if prompt.shape[0] != b:
        prompt, prompt_mask = prompt.expand(b, -1), prompt_mask.expand(b, -1)
    s = prompt.shape[1]
    p = prompt_mask.sum(-1)  # [b]
    cols = p[:, None] + torch.arange(l, device=canvas.device)[None, :]  # [b, l]
    base = torch.cat([prompt * prompt_mask, torch.zeros_like(canvas)], dim=1)  # [b, s + l]
    x = base.scatter(1, cols, canvas)
    clean = None if clean_canvas is None else base.scatter(1, cols, clean_canvas)
    key_mask = (torch.arange(s + l, device=canvas.device)[None, :] < (p + l)[:, None]).long()
    hidden = window_hidden(model, x, key_mask, clean)  # [b, s + l, d]
    return hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))


def self_conditioning_embeddings(model, hidden, mask, chunk, loo=None):
    """The family has no self-conditioning."""
    raise no_self_conditioning("block-diffusion", "llada2")


def embedding_dtype(model) -> torch.dtype:
    """The token embedding's dtype."""
    return unwrap(model).get_input_embeddings().weight.dtype
