"""Blank-cell accuracy of one checkpoint's adapter on 64 medium validation Sudoku puzzles, per decoding strategy and
step count, with the run's own sampler settings (how the solve9 sampler bug was found: iterative decoding scored
below one step).

Launch: `python eval/decode_checkpoint.py RUN_DIR RUN_DIR/final 1,12,48 topk_margin,topk_confidence [on|off]`
The optional last argument forces the self-conditioning input on or off (default: as the run's objective says;
`on` for a run trained with `objective.self_cond_p=0` is what the sampler did before that was fixed).
"""

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf


def main() -> None:
    from peft import PeftModel

    from dgtune.data import splits_for
    from dgtune.eval.__main__ import sampler_config
    from dgtune.eval.runner import evaluate
    from dgtune.models.load import load_model
    from dgtune.tasks import build_task

    run, ck, steps = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    strategies = sys.argv[4].split(",") if len(sys.argv) > 4 else ["topk_margin"]
    force_sc = {"on": True, "off": False}[sys.argv[5]] if len(sys.argv) > 5 else None
    cfg = OmegaConf.load(run / "config.yaml")
    base, tok = load_model(cfg.model)
    model = PeftModel.from_pretrained(base, str(ck)) if (ck / "adapter_config.json").exists() else base
    task = build_task(cfg.task)
    rows = [r for r in splits_for(task, cfg)["val"] if r.get("bucket") == "medium"][:64]
    for strat in strategies:
        sc = sampler_config(cfg, tok)
        sc = type(sc)(**{**sc.__dict__, "strategy": strat,
                         **({} if force_sc is None else {"self_conditioning": force_sc})})
        t0 = time.time()
        recs, _ = evaluate(model, tok, task, rows, steps, sc, 96, cfg.seed, "tuned")
        for s in steps:
            rs = [r for r in recs if r["steps"] == s]
            print(f"{strat} steps={s} cell_acc={sum(r['cell_acc'] for r in rs) / len(rs):.3f} "
                  f"solved={sum(r['solved'] for r in rs):.0f}/{len(rs)} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
