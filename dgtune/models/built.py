"""The models built in code, by `model.source`: the builder of each, `module:function(seed, **sizes) -> (model,
tokenizer)`. One dict that the loader (`dgtune.models.load`) and the config check (`dgtune.validate`) both read, so
a new tiny model is one line here and one `configs/model/*.yaml`."""

BUILT = {
    "scratch": "dgtune.models.tiny:build_tiny_model",
    "shaped": "dgtune.models.shaped:build_shaped_model",
    "llada_tiny": "dgtune.models.tiny_llada:build_tiny_llada",
    "dream_tiny": "dgtune.models.tiny_dream:build_tiny_dream",
    "llada2_tiny": "dgtune.models.tiny_llada2:build_tiny_llada2",
    "llada_moe_tiny": "dgtune.models.tiny_llada_moe:build_tiny_llada_moe",
    "sdar_tiny": "dgtune.models.tiny_sdar:build_tiny_sdar",
}
