"""dgtune: fine-tune diffusion language models (DiffusionGemma, masked diffusion) on structured tasks."""

__version__ = "0.1.0"
