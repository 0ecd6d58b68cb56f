"""Structured tasks: each builds prompt/response rows and grades a model's output with a rule-based verifier."""


def build_task(cfg):
    """The task named by `configs/task/*.yaml` (`cfg.name`): sudoku, the pretraining mixture, or your JSONL."""
    if cfg.name == "sudoku":
        from dgtune.tasks.sudoku_task import SudokuTask

        buckets = {k: list(v) for k, v in (cfg.get("test_buckets") or {}).items()}
        return SudokuTask(cfg.size, tuple(cfg.train_givens), buckets or None, cfg.get("canvas_length"),
                          bool(cfg.get("template", False)), bool(cfg.get("compact_prompt", False)),
                          int(cfg.get("fresh_per_base", 8)), cfg.get("layout", "flat"))
    if cfg.name == "pretrain_mix":
        from dgtune.tasks.base import Mixture
        from dgtune.tasks.synthetic import AdditionTask, LatinSquareTask, ReverseTask, SortTask

        makers = {
            "latin9": lambda: LatinSquareTask(9),
            "latin4": lambda: LatinSquareTask(4),
            "sort": SortTask,
            "rev": ReverseTask,
            "add": AdditionTask,
        }
        unknown = set(cfg.weights) - set(makers)
        if unknown:
            raise ValueError(f"task.weights has unknown tasks {sorted(unknown)}; known: {sorted(makers)}")
        return Mixture([makers[k]() for k in cfg.weights], list(cfg.weights.values()), cfg.canvas_length, cfg.name)
    if cfg.name == "jsonl":
        from dgtune.tasks.jsonl import JsonlTask

        return JsonlTask(cfg.get("task_name", "jsonl"), dict(cfg.files), cfg.canvas_length, cfg.get("verifier"))
    raise ValueError(f"unknown task.name={cfg.name!r} (expected 'sudoku', 'pretrain_mix' or 'jsonl')")
