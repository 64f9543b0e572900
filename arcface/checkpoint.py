"""Checkpoint layout shared by training, evaluation, export and deployment.

A checkpoint is a directory, written under a temporary name and renamed into place, so a directory
with the final name is always complete::

    <output>/checkpoints/step_00001200/
        meta.json      format version, step, world size, resolved config, preprocessing contract
        backbone.pt    the backbone's state_dict (plain tensors: loads with ``weights_only=True``)
        ...            training state added by the trainer (FC shards, optimiser, RNG, sampler)

``meta.json`` is written last inside the temporary directory; :func:`load_backbone` rebuilds the
network from the config stored there, so no network name or embedding size is ever passed by hand.

Backbone weights come in two formats, each a :class:`BackboneFormat` in :data:`BACKBONE_FORMATS`:
``checkpoint`` (the directories above) and ``insightface`` (an InsightFace ``arcface_torch`` file:
``backbone.pth``, ``model.pt`` or a run's ``checkpoint_gpu_*.pt``; the network is read from its keys
and shapes, see :mod:`backbones.insightface`). :func:`read_backbone_weights` picks the format of a path;
:func:`load_backbone` (evaluation, export, embedding) and :func:`load_initial_weights` (fine-tuning with
``backbone.init_from``) go through it, so every place that takes a model takes both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    # MobileFaceNet's shape (0 / [] = the registered network's own, so not passed)
    if spec.get("width"):
        kwargs["width"] = int(spec["width"])
    if spec.get("blocks"):
        kwargs["blocks"] = tuple(int(b) for b in spec["blocks"])
    kwargs.update(spec.get("kwargs", {}) or {})
    return name, kwargs


@dataclass(frozen=True)
class BackboneWeights:
    """Backbone weights read from some format, ready for the registry.

    ``create_backbone(name, **kwargs)`` builds the network that ``state_dict`` (registry key names)
    loads into strictly; ``meta`` has the checkpoint metadata layout (``config.backbone``,
    ``preprocess``, ``step``, ``_dir``); ``description`` says what was read, for logs.
    """

    name: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    description: str


@dataclass(frozen=True)
class BackboneFormat:
    """One on-disk format of backbone weights: which paths it claims and how it reads them."""

    name: str
    claims: Callable[[Path], bool]
    read: Callable[[Path, str | None], BackboneWeights]


INSIGHTFACE_MODEL_FILE = "model.pt"  # what arcface_torch's train_v2.py writes into its output folder


def _is_insightface_output(path: Path) -> bool:
    """An arcface_torch output folder: its ``model.pt``, and nothing of a checkpoint of ours."""
    return (path.is_dir() and (path / INSIGHTFACE_MODEL_FILE).is_file() and not (path / META_FILE).is_file()
            and find_latest(path) is None and find_latest(path / "checkpoints") is None)


def _is_checkpoint_path(path: Path) -> bool:
    # Directories (a checkpoint, a run folder) and the files of a checkpoint directory.
    if path.is_dir():
        return not _is_insightface_output(path)
    return not path.is_file() or path.name == META_FILE or (path.parent / META_FILE).is_file()


def _read_checkpoint(path: Path, arch: str | None) -> BackboneWeights:
    meta = read_meta(path)
    directory = Path(meta["_dir"])
    weights_path = directory / BACKBONE_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing backbone weights")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted/truncated file, or one holding more than plain tensors
        raise CheckpointError(f"{weights_path}: cannot load backbone weights ({exc})") from exc
    name, kwargs = backbone_kwargs(meta["config"])
    if arch is not None:
        from backbones import canonical_name

        if canonical_name(arch) != canonical_name(name):
            raise CheckpointError(f"{directory}: a checkpoint of backbone {name!r}, not {arch!r} (--arch is "
                                  "only needed for arcface_torch files; a checkpoint names its network)")
    return BackboneWeights(name, kwargs, state, meta, f"checkpoint {directory} (step {meta.get('step')})")


def _read_insightface(path: Path, arch: str | None) -> BackboneWeights:
    from backbones.insightface import (
        InsightFaceWeightsError,
        convert_insightface_state_dict,
        read_weights_file,
    )

    if path.is_dir():  # an arcface_torch output folder
        path = path / INSIGHTFACE_MODEL_FILE
    try:
        state, source = read_weights_file(path)
        converted = convert_insightface_state_dict(state, arch, source)
    except InsightFaceWeightsError as exc:
        hint = ""
        if path.name == BACKBONE_FILE:
            hint = (f" (if this is the {BACKBONE_FILE} of one of this project's checkpoints, give its "
                    f"directory, with its {META_FILE})")
        raise CheckpointError(f"{exc}{hint}") from None
    backbone = {"name": converted.name, **converted.kwargs}
    meta = {"format_version": None, "step": None, "world_size": None, "config": {"backbone": backbone},
            "preprocess": preprocess.metadata(), "_dir": str(path),
            "source": {"format": "insightface", "file": str(path), "arch": converted.arch}}
    return BackboneWeights(converted.name, dict(converted.kwargs), converted.state_dict, meta,
                           converted.describe())


# Tried in order; the first whose ``claims`` accepts the path reads it.
BACKBONE_FORMATS: dict[str, BackboneFormat] = {
    "checkpoint": BackboneFormat("checkpoint", _is_checkpoint_path, _read_checkpoint),
    "insightface": BackboneFormat("insightface", lambda path: path.is_file() or _is_insightface_output(path),
                                  _read_insightface),
}


def backbone_format(path: str | os.PathLike[str]) -> BackboneFormat:
    """The format that reads ``path``."""
    path = Path(path)
    for fmt in BACKBONE_FORMATS.values():
        if fmt.claims(path):
            return fmt
    raise CheckpointError(f"{path}: not a checkpoint directory nor a weights file")  # pragma: no cover


def read_backbone_weights(path: str | os.PathLike[str], arch: str | None = None) -> BackboneWeights:
    """Backbone weights from a checkpoint (directory, its files, a run folder) or an arcface_torch file.

    ``arch`` (a registry name or alias) is only needed, as a check, for arcface_torch files; a checkpoint
    names its own network. Raises :class:`CheckpointError` naming the file and what is wrong.
    """
    path = Path(path)
    return backbone_format(path).read(path, arch)


def weights_file(path: str | os.PathLike[str]) -> Path:
    """The file holding the backbone weights that :func:`load_backbone` reads for ``path``."""
    path = Path(path)
    if backbone_format(path).name == "checkpoint":
        return resolve_checkpoint_dir(path) / BACKBONE_FILE
    return path / INSIGHTFACE_MODEL_FILE if path.is_dir() else path


def _build(weights: BackboneWeights, source: str) -> nn.Module:
    from backbones import create_backbone

    # Built on the meta device and given uninitialised storage: every tensor is then loaded (strict), so
    # random initialisation (seconds for r100 on a CPU) would be thrown away.
    with torch.device("meta"):
        model = create_backbone(weights.name, **weights.kwargs)
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not match backbone {weights.name!r} {weights.kwargs}: "
                              f"{exc}") from exc
    return model


def load_backbone(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                  arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone of a checkpoint, or of an arcface_torch weights file, in eval mode.

    Returns the model and the checkpoint metadata (for an arcface_torch file: ``config.backbone`` as
    detected, this project's preprocessing contract, which arcface_torch shares, and ``source``).
    """
    weights = read_backbone_weights(path, arch)
    model = _build(weights, str(weights_file(path)))
    model.to(map_location).eval()
    return model, weights.meta


def load_initial_weights(model: nn.Module, path: str | os.PathLike[str], config_backbone: dict[str, Any]
                         ) -> str:
    """Copy the weights of ``path`` into ``model``, the backbone a run's config builds (fine-tuning).

    ``config_backbone`` is the run's ``backbone`` config section: the weights must be of the same network
    (name, embedding size, MobileFaceNet shape; dropout does not matter). Returns a line for the log.
    """
    from backbones import canonical_name

    name, kwargs = backbone_kwargs({"backbone": config_backbone})
    weights = read_backbone_weights(path, arch=None)
    def network(spec: dict[str, Any]) -> dict[str, Any]:  # what the weights depend on: not the dropout
        return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in spec.items() if k != "dropout"}

    shape, found = network(kwargs), network(weights.kwargs)
    if canonical_name(weights.name) != canonical_name(name) or found != shape:
        wanted = " ".join([f"backbone.name={weights.name}"] + [
            f"backbone.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "")
            for k, v in found.items()])
        raise CheckpointError(f"backbone.init_from: {weights.description} is backbone {weights.name} "
                              f"{found}, but the config builds {name} {shape}; to start from these weights "
                              f"set {wanted}")
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"backbone.init_from: {path}: weights do not fit the configured backbone: "
                              f"{exc}") from exc
    return f"backbone initialised from {weights.description}; the FC head starts from scratch"
