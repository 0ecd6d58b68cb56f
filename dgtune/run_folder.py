"""The run folder of a training run: its path (decided once, on the main process), and the W&B sweep group."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from omegaconf import DictConfig

from dgtune.checkpoint import latest_checkpoint
from dgtune.errors import InputError


def resolve_run_dir(cfg: DictConfig) -> Path:
    """`cfg.run_dir`, or `<runs_root>/<run_name>-<time>`; with `resume=true` and no run_dir, the newest run of
    that name that has a checkpoint."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    root = Path(cfg.runs_root)
    if cfg.resume:
        found = sorted(root.glob(f"{cfg.run_name}-*"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if latest_checkpoint(p) is not None]
        if not found:
            raise FileNotFoundError(f"resume=true but no run named {cfg.run_name}-* with a checkpoint under {root}/")
        return found[-1]
    suffix = time.strftime("%Y%m%d-%H%M%S")
    job = _hydra_job_num()
    return root / (f"{cfg.run_name}-{suffix}" + (f"-j{job}" if job is not None else ""))


def shared_run_dir(cfg: DictConfig, accelerator) -> tuple[Path, bool]:
    """(the run folder, whether this call created it). Resolved on the main process and broadcast, so every process
    uses the same one (the timestamped name could differ between processes); the main process creates it. A
    resolution error on the main process is raised on every process; a folder that cannot be created (no such
    parent, no permission, a read-only file system) is an InputError naming it."""
    from accelerate.utils import broadcast_object_list

    found = [None, None, False]  # [path, error message, created]
    if accelerator.is_main_process:
        try:
            path = resolve_run_dir(cfg)
            found[0], found[2] = str(path), not path.exists()
            path.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError as e:
            found[1] = str(e) if found[0] is None else _cannot_create(found[0], e)
        except OSError as e:
            found[1] = _cannot_create(found[0], e)
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    if found[1] is not None:
        if found[0] is not None:
            raise InputError(found[1])
        raise FileNotFoundError(found[1])
    return Path(found[0]), bool(found[2])


def _cannot_create(path: str, e: OSError) -> str:
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return (f"run_dir={path}: the run folder cannot be created: {e.strerror or e}{where}; choose another run_dir "
            f"or runs_root")


def _hydra_job_num():
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return hc.job.num if hc.mode.name == "MULTIRUN" else None
    except Exception:
        return None


def sweep_group(cfg: DictConfig) -> str | None:
    """The W&B group: `logger.group`, the W&B sweep's id under `wandb agent` (`sweep-<id>`), or one name shared by
    the runs of a Hydra sweep (`-m`)."""
    if cfg.logger.get("group"):
        return cfg.logger.group
    if os.environ.get("WANDB_SWEEP_ID"):
        return f"sweep-{os.environ['WANDB_SWEEP_ID']}"
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode.name == "MULTIRUN":
            return f"{cfg.run_name}-{Path(hc.sweep.dir).name}"
    except Exception:
        pass
    return None


LOCK_NAME = ".dgtune.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped process is a zombie: it writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def acquire_lock(run_dir: Path) -> Path:
    """Create `<run_dir>/.dgtune.lock` (pid and host of this process), atomically. A lock held by a live process
    raises RunLockedError; one left by a process that is gone (killed) is taken over, with a message."""
    from dgtune.errors import RunLockedError

    path = Path(run_dir) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                held, pid, host = {}, None, None
            if pid is not None and (host != me["host"] or _pid_alive(pid)):
                where = f"pid {pid}" + (f" on {host}" if host != me["host"] else "")
                raise RunLockedError(f"run folder {run_dir} is in use by {where} since {held.get('since')} (lock "
                                     f"file {path}); wait for it to finish, or delete the lock if that process is gone")
            print(f"[dgtune] taking over the stale lock {path} (pid {pid} is gone)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise RunLockedError(f"could not lock {path}: another process keeps creating it")


def release_lock(path: Path | None) -> None:
    """Remove the lock file if this process holds it."""
    if path is None:
        return
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError):
        pass
