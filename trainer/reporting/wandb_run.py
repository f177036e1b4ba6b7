"""logging.wandb: the run's Weights & Biases run, written by rank 0 beside TensorBoard.

One run directory is one W&B run: its id is kept in ``wandb.json`` in the run directory, and a resumed run
(or a rerun of a killed one) continues it. W&B's own step counter only goes forward, and a resumed run repeats
the steps after its checkpoint, so every value is logged against ``optimizer_step``, the run's x-axis: a
repeated step appears twice in W&B's history, and once in metrics.jsonl and TensorBoard (which cut it).
The files go under ``<run directory>/wandb/`` (offline: ``wandb sync`` them later).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.files import atomic_write

ID_FILE = "wandb.json"
STEP = "optimizer_step"


def check_wandb(mode: str) -> None:
    """Preflight, before any work: online needs an API key (``wandb login`` or WANDB_API_KEY), or wandb.init
    would wait for one at a prompt on a cluster node, after the model loaded."""
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_key()):
        raise UserError("logging.wandb.mode is online, but W&B has no API key here: run `wandb login` (or set "
                        "WANDB_API_KEY), or log with mode offline and `wandb sync` the run directory's wandb/ later")


def _netrc_key() -> bool:
    """Whether ~/.netrc (what ``wandb login`` writes) holds a key for the W&B host."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        hosts = netrc.netrc(os.environ.get("NETRC") or None).hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return host in hosts


def run_id(run_dir: Path) -> str:
    """The run directory's W&B run id: the one it has, else a new one, kept."""
    path = run_dir / ID_FILE
    if path.is_file():
        try:
            return str(json.loads(path.read_text())["id"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"logging.wandb: {path} does not hold this run directory's W&B run id "
                            f'({{"id": "..."}}); restore it, or delete it to start a new W&B run') from None
    new = uuid.uuid4().hex[:12]  # W&B ids are letters and digits
    atomic_write(path, (json.dumps({"id": new}) + "\n").encode())
    return new


def open_wandb(section: Any, run_dir: Path, name: str, config: dict) -> Any:
    """Start (or continue) the run directory's W&B run; returns wandb's Run."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")  # its banner and per-line notices would interleave the console
    try:
        run = wandb.init(project=section.project, entity=section.entity, name=section.name or name,
                         id=run_id(run_dir), resume="allow", mode=section.mode, dir=str(run_dir), config=config,
                         settings=wandb.Settings(console="off"))
    except Exception as exc:  # wandb raises its own errors, and network ones, from its service process
        raise UserError(f"logging.wandb: W&B did not start the run ({type(exc).__name__}: {exc}); with mode "
                        f"offline it logs under {run_dir / 'wandb'} without a network") from None
    run.define_metric(STEP)
    for prefix in ("train/*", "validation/*"):
        run.define_metric(prefix, step_metric=STEP)
    return run


def log(run: Any, optimizer_step: int, values: dict[str, float]) -> None:
    run.log({STEP: optimizer_step, **values})


def log_video(run: Any, tag: str, path: Path, fps: int, optimizer_step: int) -> None:
    import wandb

    run.log({STEP: optimizer_step, tag: wandb.Video(str(path), fps=fps, format="mp4")})
