"""DiffusionGemma's sampler (entropy-bound acceptance, renoising, adaptive stopping), batched."""
