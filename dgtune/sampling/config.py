"""The sampler's settings and results, shared by the reference loop (`reference.py`), the fast loop (`fast.py`),
the step statistics (`stats.py`, `triton_stats.py`) and the front door (`sampler.py`); this module imports no
other sampler module, so none of them import each other in a circle.

`SamplerConfig` is also the Hydra schema of the `sampler` config group (`sampler/base`, registered by
`dgtune.config.register_configs`): each `configs/sampler/*.yaml` starts from it and names only what differs, and a
mistyped key or value is an error when the config is composed. Its defaults are the defaults, in this one place
(`mode="fast"` among them). `sampler_config(cfg)` builds one from a run's config (`cfg.sampler`, `cfg.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

@dataclass
class SamplerConfig:
    """Sampler settings: the schema and defaults of `configs/sampler/*.yaml`."""

    name: str = "entropy_bound"  # the sampler config's name: a label in reports, not a setting
    strategy: str = "entropy_bound"
    max_steps: int = 48
    t_max: float = 0.8
    t_min: float = 0.4
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_canvases: int = 1
    mode: str = "fast"  # "fast": dgtune.sampling.fast; "reference": the same draws as transformers' generate()
    noise: str = "uniform"  # "uniform" (renoise with random tokens) | "mask" (absorbing [MASK] noise)
    mask_token_id: int | None = None  # for noise="mask" (default: the model config's mask_token_id)
    threshold: float = 0.9  # strategy "threshold": commit positions with max-prob > threshold
    # top-k strategies' counts per step: "even" (ceil(uncommitted / steps left), LLaDA's) | "dream" (Dream's
    # int(uncommitted (1 - s / t)) on linspace(1, 1e-3, steps + 1), the rest at the last step)
    schedule: str = "even"
    commit: str = "sample"  # committed strategies commit the sampled token ("sample") or the argmax ("argmax")
    # what a non-committing strategy (entropy_bound) outputs when a row stops: the argmax canvas ("argmax", as
    # generate()) or the sampled one ("sample": every output token a random draw, the stochastic policy RL rollouts
    # sample from; fast mode)
    last_step: str = "argmax"
    sync_every: int = 0  # fast mode: retire finished rows every N steps (0: 1 on CPU, 4 on accelerators)
    stats_backend: str = "auto"  # fast mode step statistics: "auto" (Triton on CUDA) | "torch" | "triton"
    decoder: str = "auto"  # fast mode: "fused" (dgtune.sampling.fused_decoder) | "transformers" | "auto" (fused if supported)
    decoder_dtype: str = "auto"  # fused matmuls: "auto" (model dtype) | "fast" (bf16 where fast) | "bfloat16"
    prediction: str = "denoiser"  # what the decoder outputs: "denoiser" | "mean_loo"; from objective.prediction
    compile: bool = False  # fast mode: torch.compile the fused decoder (pays off over long evals)
    # feed each step's logits to the next (as generate()); from the objective: off for a model trained without it
    # (objective.self_cond_p=0), which never saw that signal in training
    self_conditioning: bool = True
    # tokens per block. Block-diffusion families (`dgtune.sampling.block`, LLaDA2's block refinement with
    # `strategy=threshold`): 0 = the model's block size. The others (committing strategies): > 0 = LLaDA's
    # semi-autoregressive blocks, each with an equal share of the steps, commits only inside the current one
    # (`dgtune.sampling.strategies.block_window`); 0 = one block
    block_length: int = 0
    # the block-diffusion families' block refinement:
    minimal_topk: int = 1  # commits per step at least (the steps per block are capped at answer length // this)
    editing_threshold: float = 0.0  # > 0: re-write committed tokens predicted otherwise above it (LLaDA2.1)
    max_post_steps: int = 16  # with editing: refinement steps after a block has no [MASK] left
    eos_early_stop: bool = True  # a row stops once it has committed EOS with no [MASK] before it
    # a block with no [MASK] left gets one more pass (LLaDA2's generate(), where its editing acts; with commit=sample
    # it draws); false: the next block starts at once (SDAR's generate.py)
    complete_block_pass: bool = True


@dataclass
class SampleResult:
    """What a sampler returns: the tokens of every canvas run, pad after each row's first EOS, and the decoder
    forward passes each row cost."""

    tokens: torch.Tensor  # [b, n_canvases * l], pad after the first EOS
    nfe: torch.Tensor  # [b] decoder forward passes per sequence


class StepStats(NamedTuple):
    entropy: torch.Tensor  # [n] float32, entropy of softmax(logits / temperature)
    max_prob: torch.Tensor  # [n] float32
    argmax: torch.Tensor  # [n] int64 (first maximum)
    margin: torch.Tensor  # [n] float32, top1 - top2 probability
    sample: torch.Tensor | None  # [n] int64 Gumbel-max sample, None without noise


def pad_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Tokens [b, n] with every position after a row's first EOS set to `pad_id` (the EOS itself is kept): the
    output rule of every sampler mode."""
    is_eos = tokens == eos_id
    after_eos = (torch.cumsum(is_eos.long(), -1) - is_eos.long()) > 0
    return torch.where(after_eos, torch.full_like(tokens, pad_id), tokens)


def adaptive_stop(history: torch.Tensor, output: torch.Tensor, entropy: torch.Tensor, cfg: SamplerConfig):
    """The adaptive stop of the non-committing strategies, shared by both loops: a row stops once its argmax canvas
    `output` [b, l] equals each of the last `stability_threshold` ones (`history` [s, b, l]; 0 = no stability check)
    and its mean token entropy (`entropy` [b, l]) is below `confidence_threshold`. Returns (stop [b], history with
    `output` pushed in)."""
    if cfg.stability_threshold == 0:
        stable = torch.ones(output.shape[0], dtype=torch.bool, device=output.device)
    else:
        stable = (history == output[None]).all(-1).all(0)
        history = torch.roll(history, -1, 0)
        history[-1] = output
    return stable & (entropy.mean(-1) < cfg.confidence_threshold), history


def sampler_config(cfg, tokenizer=None) -> SamplerConfig:
    """SamplerConfig from a run's config `cfg.sampler` (keys it lacks, as in runs saved by older versions, take
    the defaults above); `prediction` and `self_conditioning` follow how the model was trained (`cfg.objective`)
    and, with noise "mask", `mask_token_id` is the tokenizer's."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg.sampler, resolve=True)
    if "objective" in cfg:  # what the decoder reads and outputs is fixed by how the model was trained
        d["prediction"] = cfg.objective.get("prediction", "denoiser")
        # a model trained without the self-conditioning pass never saw previous logits as input: do not feed them
        d["self_conditioning"] = float(cfg.objective.get("self_cond_p", 0.5)) > 0
    if d.get("noise") == "mask" and d.get("mask_token_id") is None and tokenizer is not None:
        d["mask_token_id"] = tokenizer.mask_token_id
    return SamplerConfig(**d)
