"""Checkpoint layout shared by training, evaluation, export and deployment.

A checkpoint is a directory, written under a temporary name and renamed into place, so a directory
with the final name is always complete::

    <output>/checkpoints/step_00001200/
        meta.json      format version, step, world size, resolved config, preprocessing contract
        backbone.pt    the backbone's state_dict (plain tensors: loads with ``weights_only=True``)
        ...            training state added by the trainer (FC shards, optimiser, RNG, sampler)

``meta.json`` is written last inside the temporary directory; :func:`load_backbone` rebuilds the
network from the config stored there, so no network name or embedding size is ever passed by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arcface import preprocess

FORMAT_VERSION = 1
META_FILE = "meta.json"
BACKBONE_FILE = "backbone.pt"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or of an unsupported format."""


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


@contextmanager
def atomic_directory(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final_path`` only if the block succeeds.

    An existing ``final_path`` is replaced only after the new one is complete, so nothing the user
    had is lost to a crash mid-write.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.parent / f".tmp-{final_path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_path.exists():
        trash = final_path.parent / f".old-{final_path.name}-{uuid.uuid4().hex[:8]}"
        final_path.rename(trash)
        tmp.rename(final_path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final_path)


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 (hex) of a resolved config in canonical JSON (sorted keys, no whitespace).

    The same digest identifies a checkpoint's ``meta.json`` config, the run's ``config.json`` and the
    ``config_sha256`` of an exported model, however each file is formatted.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_meta(directory: Path, step: int, config: dict[str, Any], world_size: int = 1,
               extra: dict[str, Any] | None = None) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "world_size": int(world_size),
        "config": config,
        "preprocess": preprocess.metadata(),
    }
    if extra:
        meta.update(extra)
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / META_FILE)


def save_backbone_checkpoint(path: str | os.PathLike[str], backbone: nn.Module, config: dict[str, Any],
                             step: int = 0) -> Path:
    """Write a backbone-only checkpoint directory (what export and evaluation need)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        torch.save(backbone.state_dict(), tmp / BACKBONE_FILE)
        write_meta(tmp, step, config)
    return path


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """Accept a checkpoint directory, its ``backbone.pt``/``meta.json``, or a run/checkpoints folder
    (then the latest complete checkpoint inside is used)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_file():
        if path.name in (BACKBONE_FILE, META_FILE):
            path = path.parent
        else:
            raise CheckpointError(f"{path}: expected a checkpoint directory (with {META_FILE} and "
                                  f"{BACKBONE_FILE}), got a file")
    if (path / META_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path}: no {META_FILE} here and no complete checkpoint below it")


def find_latest(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``directory`` (None if there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = sorted(
        (p for p in directory.iterdir()
         if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / META_FILE).is_file()),
        key=lambda p: p.name,
    )
    return steps[-1] if steps else None


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a checkpoint (any form accepted by resolve_checkpoint_dir)."""
    directory = resolve_checkpoint_dir(path)
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format version {version!r} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("backbone"), dict) \
            or "name" not in config["backbone"]:
        raise CheckpointError(f"{meta_path}: metadata has no config.backbone.name; cannot rebuild "
                              "the network")
    meta["_dir"] = str(directory)
    return meta


def backbone_kwargs(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Name and constructor arguments of the backbone described by a (resolved) config dict."""
    spec = dict(config["backbone"])
    name = spec.pop("name")
    kwargs = {k: spec[k] for k in ("embedding_size", "dropout") if k in spec}
    kwargs.update(spec.get("kwargs", {}) or {})
    return name, kwargs


def load_backbone(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone from a checkpoint's stored config and load its weights (eval mode)."""
    from backbones import create_backbone

    meta = read_meta(path)
    directory = Path(meta["_dir"])
    weights_path = directory / BACKBONE_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing backbone weights")
    try:
        state = torch.load(weights_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupted/truncated file, or one holding more than plain tensors
        raise CheckpointError(f"{weights_path}: cannot load backbone weights ({exc})") from exc
    name, kwargs = backbone_kwargs(meta["config"])
    model = create_backbone(name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path}: weights do not match backbone {name!r} {kwargs}: "
                              f"{exc}") from exc
    model.to(map_location).eval()
    return model, meta
