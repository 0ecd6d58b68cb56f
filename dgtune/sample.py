"""`python -m dgtune.sample RUN_DIR "sudoku:0030...": denoise a response for one prompt with a run's model.

Extra `key=value` arguments override the run's config (e.g. `sampler.max_steps=12 seed=3`). Prints the
response and the number of decoder forward passes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> str:
    """CLI entry point."""
    from dgtune.data import prompt_ids
    from dgtune.eval.__main__ import load_run, merge_overrides, sampler_config
    from dgtune.sampling.sampler import sample

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__)
        raise SystemExit(2)
    run_dir, prompt = Path(argv[0]), argv[1]
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a dgtune run folder (no config.yaml)")
    cfg = merge_overrides(OmegaConf.load(run_dir / "config.yaml"), argv[2:])
    model, tokenizer, _ = load_run(run_dir, cfg)
    model.eval()
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    canvas_length = cfg.task.get("canvas_length") or model.config.canvas_length
    res = sample(model, ids, sampler_config(cfg, tokenizer), torch.Generator().manual_seed(cfg.seed),
                 tokenizer.eos_token_id, tokenizer.pad_token_id, canvas_length)
    text = tokenizer.decode(res.tokens[0], skip_special_tokens=True)
    print(text)
    print(f"[dgtune] nfe={int(res.nfe[0])}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
