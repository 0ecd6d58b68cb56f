"""`python -m dgtune.export RUN_DIR OUT_DIR [--merge | --publish] [--overwrite]`: package a run's adapter, or merge it into a
standalone model, or publish the run as a folder that `python -m dgtune.eval OUT_DIR` and plain peft both load.

Without `--merge` the PEFT adapter (adapter_config.json + adapter_model.safetensors) and tokenizer are copied.
With `--merge`: DiffusionGemma's encoder and decoder share tied base weights but get separate adapters, so
merging both deltas into the shared tensors would be wrong. The base is therefore untied first (every shared
tensor gets its own copy), each adapter is merged into its own copy, and `tie_word_embeddings=False` is saved.
The merged model is larger than the base but gives the same outputs as base + adapter. A run trained on a
quantised base (`model.quantization`) is merged into the unquantised base weights.
Both write `generation_config.json` (EOS, one canvas, the step count, `--steps N` to change it) so that a plain
`model.generate(**ids)` samples as dgtune's reference mode does; the adapter names its base portably (the Hub id,
the bundled base's folder name, or `--base-model NAME_OR_PATH`).
`--publish` writes a run-shaped folder: `final/` (the adapter as above, without peft's placeholder card),
`config.yaml` (the run's config, its machine paths cleared) and the run's report and learning curve when present;
the model card (`OUT_DIR/README.md`) is the publisher's to write. It never writes into an existing `OUT_DIR/final`.
An `OUT_DIR` that already holds weights is refused unless `--overwrite` is given (`--publish` never overwrites).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def untie_shared_parameters(model: torch.nn.Module) -> int:
    """Give every parameter that appears under several names its own copy; returns how many were untied."""
    seen: dict[int, str] = {}
    to_untie = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            to_untie.append(name)
        else:
            seen[id(param)] = name
    for name in to_untie:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().clone()))
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "text_config"):
        model.config.text_config.tie_word_embeddings = False
    return len(to_untie)


def merge_adapter(base_model, adapter_dir: str):
    """Untie the base, load the adapter, and merge it; returns a plain DiffusionGemmaForBlockDiffusion."""
    from peft import PeftModel

    untie_shared_parameters(base_model)
    return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()


def base_model_name(cfg) -> str:
    """How an exported adapter names its base: the Hub id of a `model.source=pretrained` run, else (the bundled
    base, a local folder) the folder's name only, never an absolute path of the training machine."""
    name = cfg.model.get("name_or_path")
    if cfg.model.source == "pretrained" and name and not name.startswith((".", "/")) and not Path(name).exists():
        return name
    from dgtune.models.load import BUNDLED_DIR

    from dgtune.models.built import BUILT

    if cfg.model.source in BUILT:  # built in code by dgtune.models (no folder to name)
        return f"dgtune model.source={cfg.model.source}"
    return Path(name).name if name else BUNDLED_DIR.name


def write_generation_config(folder: Path, cfg, tokenizer, canvas_length: int, steps: int | None = None) -> Path:
    """`generation_config.json` for transformers' `generate()`: EOS and pad ids, one canvas per answer
    (`max_new_tokens` = canvas_length x sampler.max_canvases), the step count (`steps`, default
    `sampler.max_steps`) and the entropy-bound sampler's settings, so that `model.generate(**ids)` draws exactly
    what dgtune's reference mode draws (other strategies have no generate() counterpart: only ids and lengths)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

    sc = cfg.sampler
    kw = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
          "max_new_tokens": canvas_length * int(sc.get("max_canvases", 1)),
          "max_denoising_steps": int(steps or sc.max_steps)}
    if sc.get("strategy", "entropy_bound") == "entropy_bound":
        kw.update(t_min=float(sc.t_min), t_max=float(sc.t_max), stability_threshold=int(sc.stability_threshold),
                  confidence_threshold=float(sc.confidence_threshold),
                  sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(sc.entropy_bound)))
    DiffusionGemmaGenerationConfig(**kw).save_pretrained(str(folder))
    return Path(folder) / "generation_config.json"


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point: `RUN_DIR OUT_DIR [--merge | --publish] [--base-model NAME_OR_PATH] [--steps N]`."""
    from dgtune.validate import cli_errors

    with cli_errors():
        return _main(argv)


def _main(argv: list[str] | None = None) -> Path:
    from omegaconf import OmegaConf

    from dgtune.checkpoint import fix_modes
    from dgtune.models.load import load_model
    from dgtune.tasks import build_task
    from dgtune.validate import quiet_third_party

    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, args, it = {}, [], iter(argv)
    for a in it:
        if a in ("--base-model", "--steps"):
            opts[a] = next(it, None)
        else:
            args.append(a)
    merge, publish, overwrite = "--merge" in args, "--publish" in args, "--overwrite" in args
    args = [a for a in args if a not in ("--merge", "--publish", "--overwrite")]
    if len(args) != 2 or None in opts.values() or (merge and publish):
        print(__doc__)
        raise SystemExit(2)
    run_dir, out = Path(args[0]), Path(args[1])
    held = weights_in(out)
    if held and not publish and not overwrite:
        raise FileExistsError(f"{out} already holds weights ({', '.join(held)}): export into a new folder, or pass "
                              "--overwrite to replace them")
    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        raise FileNotFoundError(f"{final} has no adapter_config.json: not a finished LoRA run")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    canvas_length = build_task(cfg.task).canvas_length
    steps = int(opts["--steps"]) if "--steps" in opts else None
    if publish:
        return publish_run(run_dir, out, cfg, opts.get("--base-model"), canvas_length, steps)
    if not merge:
        base = copy_adapter(final, out, cfg, opts.get("--base-model"), canvas_length, steps)
        fix_modes(out)
        print(f"[dgtune] adapter copied to {out} (base: {base!r}; "
              f"set model.config.canvas_length={canvas_length} on the base before generate())")
        return out
    cfg.model.quantization = None  # merge into the 16-bit base (a 4-bit / 8-bit run's adapter was trained on it)
    base, tokenizer = load_model(cfg.model)
    base.config.canvas_length = canvas_length
    merged = merge_adapter(base, str(final))
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    write_generation_config(out, cfg, tokenizer, canvas_length, steps)
    fix_modes(out)
    print(f"[dgtune] merged model written to {out}")
    return out


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")


def weights_in(folder: Path) -> list[str]:
    """The weight files already in `folder` (adapter or model, sharded model files included)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in WEIGHT_FILES or (p.name.startswith("model-") and p.name.endswith(".safetensors")))


def copy_adapter(final: Path, out: Path, cfg, base_model: str | None, canvas_length: int, steps: int | None) -> str:
    """Copy a run's `final/` adapter to `out`, name its base portably (`base_model_name`) and write the generation
    config; returns the base name written."""
    import json

    shutil.copytree(final, out, dirs_exist_ok=True)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = base_model or base_model_name(cfg)
    (out / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(final))
    write_generation_config(out, cfg, tokenizer, canvas_length, steps)
    return adapter_cfg["base_model_name_or_path"]


PUBLISHED_FILES = ("report.json", "report.md", "accuracy_vs_steps.png", "learning_curve.jsonl", "learning_curve.png")


def publish_run(run_dir: Path, out: Path, cfg, base_model: str | None, canvas_length: int, steps: int | None) -> Path:
    """A run-shaped folder: `out/final` (portable adapter + tokenizer + generation config), `out/config.yaml` (run
    paths cleared) and the run's report files; refuses an existing `out/final` (published weights are not
    overwritten)."""
    from omegaconf import OmegaConf

    from dgtune.checkpoint import fix_modes

    if (out / "final").exists():
        raise FileExistsError(f"{out / 'final'} exists: publish into a new folder (published weights are not overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    base = copy_adapter(run_dir / "final", out / "final", cfg, base_model, canvas_length, steps)
    (out / "final" / "README.md").unlink(missing_ok=True)  # peft's placeholder card (and the training machine's paths)
    cfg.run_dir, cfg.resume = None, False
    OmegaConf.save(cfg, out / "config.yaml")
    for name in PUBLISHED_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, out / name)
    fix_modes(out)
    print(f"[dgtune] published {run_dir} to {out} (base: {base!r}); "
          f"`python -m dgtune.eval {out}` evaluates it; add a model card as {out / 'README.md'}")
    return out


if __name__ == "__main__":
    main()
