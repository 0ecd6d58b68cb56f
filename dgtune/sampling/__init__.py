"""Diffusion samplers: `sampler.sample` (reference mode mirrors transformers' generate(); fast mode in `fast.py`),
the decoding strategies (`strategies.py`), per-position step statistics (`stats.py`, Triton kernel in
`triton_stats.py`) and counter-based per-row random numbers (`rng.py`)."""
