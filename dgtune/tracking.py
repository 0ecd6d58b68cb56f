"""Metrics go to `metrics.jsonl` in the run folder, and to Weights & Biases with `logger=wandb`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def trim_metrics(run_dir: Path, step: int) -> int:
    """Drop the records after `step` from `<run_dir>/metrics.jsonl` (atomically), so a run resumed from the
    checkpoint of `step` logs each later step once; returns how many records were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a half-written last line of a killed run
            pass
    if len(keep) != len(lines):
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


class Tracker:
    """Append-only JSONL metrics plus an optional W&B run (offline when no API key is set).

    `enabled=False` (every process but the main one of a multi-process run) writes nothing."""

    def __init__(self, run_dir: Path, cfg, run_config: dict, name: str, group: str | None, resume_id: str | None = None,
                 enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        self.run_id = resume_id
        if not enabled:
            return
        if cfg.kind == "wandb":
            import wandb

            mode = cfg.get("mode") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            if mode == "offline" and not cfg.get("mode"):
                print("[dgtune] W&B: no WANDB_API_KEY set, logging offline to", Path(run_dir) / "wandb",
                      "(sync later with `wandb sync`)")
            self.wandb = wandb.init(
                project=cfg.project, name=name, group=group, config=run_config, dir=str(run_dir), mode=mode,
                id=resume_id, resume="allow" if resume_id else None,
            )
            self.run_id = self.wandb.id
            info = {"project": cfg.project, "group": group, "id": self.run_id, "mode": mode}
            (Path(run_dir) / "wandb_run.json").write_text(json.dumps(info, indent=2))
        elif cfg.kind != "none":
            raise ValueError(f"logger.kind must be 'none' or 'wandb', got {cfg.kind!r}")

    def log(self, metrics: dict, step: int) -> None:
        """Write one metrics record."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_report(self, paths: dict, rows: list[dict]) -> None:
        """Attach the eval report (table + plot) to the W&B run."""
        if self.wandb is None:
            return
        import wandb

        cols = list(rows[0]) if rows else []
        self.wandb.log({"eval/report": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows]),
                        "eval/accuracy_vs_steps": wandb.Image(str(paths["png"]))})
        self.wandb.save(str(paths["json"]), base_path=str(Path(paths["json"]).parent))

    def finish(self) -> None:
        """Close the W&B run."""
        if self.wandb is not None:
            self.wandb.finish()
