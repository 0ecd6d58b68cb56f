"""Structured tasks: each builds prompt/response rows and grades a model's output with a rule-based verifier."""


def build_task(cfg):
    """The task named by `configs/task/*.yaml` (`cfg.name`): sudoku, or the pretraining mixture."""
    if cfg.name == "sudoku":
        from dgtune.tasks.sudoku_task import SudokuTask

        buckets = {k: list(v) for k, v in (cfg.get("test_buckets") or {}).items()}
        return SudokuTask(cfg.size, tuple(cfg.train_givens), buckets or None, cfg.get("canvas_length"))
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
    raise ValueError(f"unknown task.name={cfg.name!r} (expected 'sudoku' or 'pretrain_mix')")
