"""The model families the trainer knows, keyed by the transformer class a model directory names.

    load_family("THUDM/CogVideoX-5b")      a local directory or a hub id -> its family (configs read, no weights)

A directory names its transformer class in transformer/config.json (``_class_name``) and model_index.json;
``FAMILIES`` maps that name to the family that reads it. A new family is one module under trainer/families/
implementing base.ModelFamily and one entry here; a new variant of a family is configuration its module reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from trainer.errors import UserError
from trainer.families.base import ModelFamily
from trainer.families.cogvideox import TRANSFORMER_CLASS as COGVIDEOX_TRANSFORMER
from trainer.families.cogvideox import CogVideoX

FAMILIES: dict[str, Callable[[Path, dict], ModelFamily]] = {
    COGVIDEOX_TRANSFORMER: CogVideoX,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What the trainer needs from a model directory; validation and packing load more.
REQUIRED_FILES = ("transformer/config.json", "scheduler/scheduler_config.json")


def resolve_model_dir(path: str, sampling: bool = False, weights: bool = True, vae: bool = False) -> Path:
    """A local diffusers model directory, or a hub id fetched into the HF cache: the transformer and scheduler,
    with ``sampling`` (validation videos) the VAE, tokenizer and text encoder too, with ``vae`` (training an
    image-to-video model) the VAE; without ``weights`` (the planner) only the configs."""
    local = Path(path).expanduser()
    if local.exists():
        missing = [f for f in REQUIRED_FILES if not (local / f).is_file()]
        if missing:
            raise UserError(f"model.path: {local} is not a diffusers model directory (missing {', '.join(missing)})")
        return local
    if not _HUB_ID.match(path):
        raise UserError(f"model.path: no such directory: {local}")
    try:
        from filelock import FileLock
        from huggingface_hub import constants, snapshot_download

        parts = ["vae/*", "tokenizer/*", "text_encoder/*"] if sampling else [
            "vae/*" if vae else "vae/config.json"]  # the config: the latent scale
        transformer = "transformer/*" if weights else "transformer/config.json"
        patterns = ["model_index.json", transformer, "scheduler/*", *parts]
        # Every rank of a node starts here at once: one downloads while the others wait for the lock, then
        # find the files in the cache (snapshot_download only asks the hub what it already has). A cache the
        # ranks cannot write a lock into (read-only, shared) is used as it is.
        lock = Path(constants.HF_HUB_CACHE) / f".trainer-{path.replace('/', '--')}.lock"
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock)):
                fetched = snapshot_download(path, allow_patterns=patterns)
        except PermissionError:
            fetched = snapshot_download(path, allow_patterns=patterns)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise UserError(f"model.path: {path!r} is not a local directory and could not be fetched from the hub "
                        f"({exc})") from None
    return resolve_model_dir(fetched, sampling, weights, vae)


def transformer_class(model_dir: Path, config: dict) -> str | None:
    """The transformer class the directory names: transformer/config.json, else model_index.json."""
    if config.get("_class_name"):
        return config["_class_name"]
    index = model_dir / "model_index.json"
    entry = json.loads(index.read_text()).get("transformer") if index.is_file() else None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def family_for(model_dir: Path) -> ModelFamily:
    """The family of a resolved model directory."""
    source = model_dir / "transformer" / "config.json"
    try:
        config = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: cannot read {source} ({exc})") from None
    name = transformer_class(model_dir, config)
    if name not in FAMILIES:
        raise UserError(f"model.path: {source} names the transformer class {name!r}; this trainer knows "
                        f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[name](model_dir, config)


def load_family(path: str, sampling: bool = False, weights: bool = True, vae: bool = False) -> ModelFamily:
    """``resolve_model_dir``, then ``family_for``."""
    return family_for(resolve_model_dir(path, sampling, weights, vae))
