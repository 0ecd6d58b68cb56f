"""Cell accuracy and solved count of one checkpoint's adapter on validation rows (default: the first 64 of bucket
`medium`), per decoding strategy and step count, with the run's own sampler settings (how the solve9 sampler bug was
found: iterative decoding scored below one step).

Launch: `python eval/analysis/decode_checkpoint.py RUN_DIR RUN_DIR/final 1,12,48 topk_margin,topk_confidence [on|off]
[bucket=NAME] [n=N] [split=test] [guided=1]`. The weights folder holds an adapter or a full model (a full
fine-tune's `checkpoints/step_N/weights`). `on|off` forces the self-conditioning input (default: as the run's
objective says; `on` for a run trained with `objective.self_cond_p=0` is what the sampler did before that was
fixed); `bucket=` / `n=` pick the rows (`bucket=all`: every bucket, in split order, as the quick evals take them)
of the validation split or, with `split=test`, the test split; `guided=1` samples through the task's rule guide.
"""

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf


def main() -> None:
    from dgtune.data import splits_for
    from dgtune.eval.runs import load_run
    from dgtune.sampling.config import sampler_config
    from dgtune.eval.runner import evaluate
    from dgtune.tasks import build_task

    keys = ("bucket=", "n=", "split=", "guided=")
    opts = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith(keys))
    args = [a for a in sys.argv[1:] if not a.startswith(keys)]
    run, ck, steps = Path(args[0]), Path(args[1]), [int(s) for s in args[2].split(",")]
    strategies = args[3].split(",") if len(args) > 3 else ["topk_margin"]
    force_sc = {"on": True, "off": False}[args[4]] if len(args) > 4 else None
    bucket, n = opts.get("bucket", "medium"), int(opts.get("n", 64))
    split, guided = opts.get("split", "val"), opts.get("guided", "0") == "1"
    cfg = OmegaConf.load(run / "config.yaml")
    model, tok, _ = load_run(run, cfg, ck)
    task = build_task(cfg.task)
    rows = [r for r in splits_for(task, cfg)[split] if bucket == "all" or r.get("bucket") == bucket][:n]
    for strat in strategies:
        sc = sampler_config(cfg, tok)
        sc = type(sc)(**{**sc.__dict__, "strategy": strat,
                         **({} if force_sc is None else {"self_conditioning": force_sc})})
        t0 = time.time()
        recs, _ = evaluate(model, tok, task, rows, steps, sc, 96, cfg.seed, "tuned", guided=guided)
        for s in steps:
            rs = [r for r in recs if r["steps"] == s]
            print(f"{strat} steps={s} cell_acc={sum(r['cell_acc'] for r in rs) / len(rs):.3f} "
                  f"solved={sum(r['solved'] for r in rs):.0f}/{len(rs)} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
