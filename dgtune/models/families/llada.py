"""LLaDA (GSAI-ML/LLaDA-8B-Instruct and its kin): the family profile and its model calls.

A LLaDA is one bidirectional Transformer over prompt + answer (no encoder/decoder split, no KV cache that the
answer reads): `encode` keeps the prompt ids as the "cache", and every denoising pass runs the whole stack over
each row's [prompt ; canvas] laid out contiguously, padding after it (as LLaDA's SFT batches are). No
self-conditioning, no AR co-loss: `objective=llada`.

Facts (cite what the code uses):
- names and sizes: `dgtune/models/tiny_llada.py` (LLaDA-8B-Instruct's weight names; mask id 126,336);
- LoRA: q/k/v, attn_out and the SwiGLU MLP (ff_proj, up_proj, ff_out) of every block, anchored at
  `model.transformer.blocks.N.` so that the output head `model.transformer.ff_out` (which shares the last name with
  each block's down projection) is never adapted;
- noise and loss: `objective.kind=llada` (`dgtune.diffusion.objective`): ML-GSAI/LLaDA `GUIDELINES.md` ("SFT"):
  t ~ U(0, 1), p = (1 - 1e-3) t + 1e-3, each answer token (EOS padding included) masked with probability p,
  cross-entropy / p on the masked positions, / the answer length per row, / the batch size.
The real checkpoints load only with `model.trust_remote_code=true` (their class is not in transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgtune.diffusion.model_calls import unwrap
from dgtune.models.family import ModelFamily, register_family

LLADA = register_family(ModelFamily(
    name="llada",
    architectures=("LLaDAModelLM",),  # LLaDA-MoE's model_type is also "llada": architecture first
    model_types=("llada", "dgtune_tiny_llada"),
    model_class="AutoModel",
    lora_target_modules=r"model\.transformer\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    noise="mask",
    remote_code=True,  # LLaDAModelLM is not a transformers class: its modeling file ships with the checkpoint
    calls=__name__,
))


@dataclass
class PromptCache:
    """What `encode` keeps of a prompt batch: ids [b, s] and attention mask [b, s] (right-padded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def get_seq_length(self) -> int:
        """The prompt columns."""
        return self.input_ids.shape[1]


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, position_ids=None):
    """(PromptCache, None): a LLaDA has no separate encoder pass; the prompt is read again with each canvas."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return PromptCache(input_ids, attention_mask), None


def training_cache(model):
    """None: nothing to prepare."""
    return None


def decoder_context(model, cache: PromptCache, prompt_len: torch.Tensor, canvas_length: int):
    """(cache, attention mask [b, s + l]): each row's prompt tokens and the whole canvas."""
    s = cache.get_seq_length()
    cols = torch.arange(s, device=prompt_len.device)[None, :] < prompt_len[:, None]  # [b, s]
    canvas = torch.ones(prompt_len.shape[0], canvas_length, dtype=torch.bool, device=prompt_len.device)
    return cache, torch.cat([cols, canvas], dim=1).long()


def decode_hidden(model, canvas: torch.Tensor, cache: PromptCache, self_conditioning_logits=None,
                  self_conditioning_mask=None, decoder_attention_mask=None, decoder_position_ids=None,
                  self_conditioning_embeddings=None) -> torch.Tensor:
    """The stack over each row's [prompt ; canvas], laid out as LLaDA reads a sequence: the row's p prompt tokens,
    then its canvas at positions p .. p + l - 1, then padding (masked out); returns the canvas' final-normed hidden
    states [b, l, d]. The row's prompt length comes from the cache's mask, so `decoder_attention_mask` and
    `decoder_position_ids` (DiffusionGemma's decoder arguments) are not needed."""
    if self_conditioning_logits is not None or self_conditioning_embeddings is not None:
        raise ValueError("the LLaDA family has no self-conditioning: use objective.self_cond_p=0 (objective=llada)")
    b, l = canvas.shape
    prompt, prompt_mask = cache.input_ids, cache.attention_mask
    if prompt.shape[0] != b:  # one prompt batch for several canvases of the same rows
        prompt, prompt_mask = prompt.expand(b, -1), prompt_mask.expand(b, -1)
    s = prompt.shape[1]
    p = prompt_mask.sum(-1)  # [b] prompt lengths
    cols = p[:, None] + torch.arange(l, device=canvas.device)[None, :]  # [b, l] the canvas' positions
    x = torch.cat([prompt * prompt_mask, torch.zeros_like(canvas)], dim=1)  # [b, s + l]
    x = x.scatter(1, cols, canvas)
    mask = (torch.arange(s + l, device=canvas.device)[None, :] < (p + l)[:, None]).long()  # [b, s + l]
    hidden = _final_hidden(unwrap(model), x, mask)  # [b, s + l, d]
    return hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))


def _final_hidden(core, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states [b, s, d]: the tiny LLaDA's `hidden`, or the checkpoint's forward with
    `output_hidden_states` (LLaDA's modeling appends the state after `ln_f` last, as transformers does)."""
    if hasattr(core, "hidden"):
        return core.hidden(x, mask)
    return core(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output head `model.transformer.ff_out` on hidden [b, l, d] -> [b, l, v]."""
    return unwrap(model).model.transformer.ff_out(hidden)


def lm_head_weight(model) -> tuple[torch.Tensor, float | None]:
    """(head weight [v, d], no soft-cap)."""
    return unwrap(model).model.transformer.ff_out.weight, None


def self_conditioning_embeddings(model, hidden, mask, chunk, loo=None):
    """The family has no self-conditioning."""
    raise ValueError("the LLaDA family has no self-conditioning: use objective.self_cond_p=0 (objective=llada)")


def has_sliding_layers(model) -> bool:
    """No sliding-window layers."""
    return False


def embedding_dtype(model) -> torch.dtype:
    """The token embedding's dtype."""
    return unwrap(model).model.transformer.wte.weight.dtype


def vocab_size(model) -> int:
    """The output vocabulary."""
    return unwrap(model).config.vocab_size


def encoder_layers(model) -> list:
    """No encoder layers of its own (gradient checkpointing is not wired for this family yet)."""
    return []
