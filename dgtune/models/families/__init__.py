"""One module per model family: its profile (`dgtune.models.family.ModelFamily`, registered where it is defined)
and its model calls (the functions `dgtune.diffusion.model_calls` delegates to). `family_of` imports every module
here the first time it meets a model it does not know yet."""
