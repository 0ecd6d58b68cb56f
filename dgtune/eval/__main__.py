"""`python -m dgtune.eval RUN_DIR [key=value ...]`: accuracy against denoising steps, base vs tuned.

Loads the run's config (`RUN_DIR/config.yaml`) and composes the overrides onto it with Hydra, in the grammar of
`dgtune.train` (e.g. `task.test_file=PATH`, `eval.steps=[1,4,12]`, `sampler=topk_confidence` for
configs/sampler/topk_confidence.yaml, `sampler.mode=reference`), loads the base model and the run's adapter (unmerged) from `RUN_DIR/final`, samples the
test rows at every step count with the shared sampler (fast mode unless the config says otherwise), and writes
`report.json`, `report.md` and `accuracy_vs_steps.png` into a new folder `RUN_DIR/eval-<time>/` (or `eval.out_dir`),
never over an existing report unless `eval.overwrite=true` (which, without `eval.out_dir`, writes into RUN_DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from dgtune.eval.runner import require_test_rows, run_report, test_rows
from dgtune.eval.runs import eval_out_dir, load_run, compose_run, training_meta


def main(argv: list[str] | None = None) -> str:
    """CLI entry point (dgtune's own errors print one line and exit 2)."""
    from dgtune.validate import cli_errors

    with cli_errors():
        return _main(argv)


def _main(argv: list[str] | None = None) -> str:
    import torch

    from dgtune.data import splits_for
    from dgtune.tasks import build_task
    from dgtune.validate import check_config, check_task_features, quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return ""
    run_dir = Path(argv[0])
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a dgtune run folder (no config.yaml)")
    cfg = compose_run(OmegaConf.load(run_dir / "config.yaml"), argv[1:])
    check_config(cfg, sections=("eval", "task", "sampler"))
    quiet_third_party()
    task = build_task(cfg.task)
    check_task_features(cfg, task)  # before any folder is made
    out_dir = eval_out_dir(run_dir, cfg)
    cfg.eval.out_dir = str(out_dir)
    torch.manual_seed(cfg.seed)
    if cfg.task.get("test_file"):
        test_rows(task, None, cfg)  # a bad test file fails before the models are loaded
    tuned, tokenizer, base = load_run(run_dir, cfg)
    for m in (tuned, base):
        if m is not None:
            m.config.canvas_length = task.canvas_length
    splits = None
    if not cfg.task.get("test_file"):
        splits = splits_for(task, cfg)
        require_test_rows(task, splits, cfg)
    return run_report(tuned, tokenizer, task, splits, cfg, out_dir, None, base_model=base, meta=training_meta(run_dir))


if __name__ == "__main__":
    main()
