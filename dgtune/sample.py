"""`python -m dgtune.sample RUN_DIR "sudoku:0030...": denoise a response for one prompt with a run's model.

It samples exactly as `dgtune.eval` does (same sampler settings, the task's canvas template for template-trained
runs, per-row seeds), at `sampler.max_steps` steps. Extra `key=value` arguments override the run's config (e.g.
`sampler.max_steps=12 seed=3`). Prints the answer (for Sudoku a grid and its verdict), then the decoder forward passes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf


def sample_prompt(model, tokenizer, task, prompt: str, cfg) -> dict:
    """Sample one prompt through the eval path (`dgtune.eval.runner.evaluate` on a one-row list): returns its
    record (`output` text, grade, `nfe`). A task with `row_from_prompt` validates the prompt first."""
    from dgtune.sampling.config import sampler_config
    from dgtune.eval.runner import evaluate
    from dgtune.tasks.base import make_row

    row = task.row_from_prompt(prompt) if hasattr(task, "row_from_prompt") else make_row(task.name, prompt, "")
    records, _ = evaluate(model, tokenizer, task, [row], [cfg.sampler.max_steps], sampler_config(cfg, tokenizer), 1,
                          cfg.seed, "tuned")
    return records[0]


def format_answer(task, row: dict, rec: dict) -> str:
    """The sampled answer for a person: for Sudoku the grid (one line per row) and a verdict line (solved, or
    what is wrong); for other tasks the output text and its grade."""
    size = getattr(task, "size", None)
    if size is None or not row.get("puzzle"):
        grade = " ".join(f"{k}={rec[k]:.0f}" for k in ("solved", "parse_fail") if k in rec)
        return f"{rec['output']}\n[dgtune] {grade}"
    from dgtune.tasks.sudoku import engine as sudoku

    grid = sudoku.parse_grid(rec["output"], size)
    if grid is None:
        return f"{rec['output']}\n[dgtune] verdict: unparseable (not {size * size} digits 1-{size})"
    lines = [" ".join(grid[r * size:(r + 1) * size]) for r in range(size)]
    check = sudoku.check_grid(row["puzzle"], grid, size)
    if check["valid"] and check["givens_kept"]:
        verdict = "solved"
    elif not check["givens_kept"]:
        verdict = "not solved: changes a given"
    else:
        verdict = "not solved: a row, column or box repeats a digit"
    return "\n".join(lines) + f"\n[dgtune] verdict: {verdict}"


def main(argv: list[str] | None = None) -> str:
    """CLI entry point (dgtune's own errors, e.g. a malformed puzzle, print one line and exit 2)."""
    from dgtune.validate import cli_errors

    with cli_errors():
        return _main(argv)


def _main(argv: list[str] | None = None) -> str:
    from dgtune.eval.runs import load_run, compose_run
    from dgtune.validate import quiet_third_party
    from dgtune.validate import check_config
    from dgtune.tasks import build_task

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__)
        raise SystemExit(2)
    run_dir, prompt = Path(argv[0]), argv[1]
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a dgtune run folder (no config.yaml)")
    cfg = compose_run(OmegaConf.load(run_dir / "config.yaml"), argv[2:])
    check_config(cfg, sections=("sampler",))
    quiet_third_party()
    task = build_task(cfg.task)
    row = task.row_from_prompt(prompt) if hasattr(task, "row_from_prompt") else None  # bad prompt: fail before loading
    model, tokenizer, _ = load_run(run_dir, cfg)
    model.config.canvas_length = task.canvas_length
    rec = sample_prompt(model, tokenizer, task, prompt, cfg)
    print(format_answer(task, row or {}, rec))
    print(f"[dgtune] nfe={int(rec['nfe'])}", file=sys.stderr)
    return rec["output"]


if __name__ == "__main__":
    main()
