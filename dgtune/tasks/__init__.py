"""Structured tasks: each builds prompt/response rows and grades a model's output with a rule-based verifier."""


def build_task(cfg):
    """The task named by `configs/task/*.yaml` (`cfg.name`): sudoku, the pretraining mixture, your JSONL,
    or a structured family (countdown, json_record, coloring)."""
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
    if cfg.name == "data":
        from dgtune.tasks.files import FileTask

        return FileTask(cfg.get("task_name", "data"), dict(cfg.files), cfg.canvas_length, dict(cfg.get("columns") or {}),
                        cfg.get("verifier"), cfg.get("format"), cfg.get("template"), cfg.get("template_free", "_"),
                        cfg.get("max_canvases", 1))
    if cfg.name == "mixture":
        return build_mixture(cfg)
    if cfg.name == "synthetic":  # one generated task of the pretraining mixture, e.g. inside task=mixture
        from dgtune.tasks import synthetic

        makers = {"sort": synthetic.SortTask, "rev": synthetic.ReverseTask}
        if cfg.kind not in makers:
            raise ValueError(f"task.kind={cfg.kind!r}: expected one of {sorted(makers)}")
        return makers[cfg.kind](cfg.get("min_len", 4), cfg.get("max_len", 40))
    if cfg.name in ("countdown", "json_record", "coloring"):
        from dgtune.tasks.structured import build_structured

        return build_structured(cfg)
    raise ValueError(f"unknown task.name={cfg.name!r} (expected 'sudoku', 'pretrain_mix', 'jsonl', 'data', "
                     "'mixture', 'countdown', 'json_record' or 'coloring')")


def build_mixture(cfg):
    """`task=mixture`: one adapter on several tasks (`task.tasks.<key>`: any task config; `task.weights.<key>`: its
    share of the rows), all on one canvas of `task.canvas_length` tokens, answers up to `task.max_canvases`
    canvases; reports break results down per task (`dgtune.eval.report`)."""
    from omegaconf import OmegaConf

    from dgtune.tasks.base import Mixture

    subs = cfg.get("tasks") or {}
    if not subs:
        raise ValueError("task=mixture needs task.tasks.<key>: a task config per task (see configs/task/mixture.yaml)")
    weights = dict(cfg.get("weights") or {})
    unknown = set(weights) - set(subs)
    if unknown:
        raise ValueError(f"task.weights names tasks {sorted(unknown)} that task.tasks lacks ({sorted(subs)})")
    tasks = []
    for key, sub in subs.items():
        sub = OmegaConf.merge(OmegaConf.to_container(sub, resolve=True), {"canvas_length": cfg.canvas_length})  # one canvas for all
        tasks.append(build_task(sub))
        if getattr(tasks[-1], "use_template", False):
            raise ValueError(f"task.tasks.{key}: canvas templates are not supported inside a mixture")
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise ValueError(f"task=mixture: two tasks share a name ({names}); give each a task_name")
    mix = Mixture(tasks, [float(weights.get(k, 1.0)) for k in subs], cfg.canvas_length, cfg.get("task_name", "mixture"))
    mix.max_canvases = max([int(cfg.get("max_canvases", 1))] + [getattr(t, "max_canvases", 1) for t in tasks])
    return mix
