"""Denoising objectives: corruption, losses and the model calls they need."""
