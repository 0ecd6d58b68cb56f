"""Model building (the tiny bundled DiffusionGemma) and loading (bundled, local folder, or the Hub)."""
