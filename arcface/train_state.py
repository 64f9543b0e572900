"""Training checkpoints: everything needed to continue a run exactly, on the same or another world size.

A training checkpoint is a checkpoint directory in the sense of :mod:`arcface.checkpoint` (so
``load_backbone``, evaluation and export read it unchanged) with the training state beside it::

    <output>/checkpoints/step_00001200/
        backbone.pt                        rank 0: backbone state_dict (unwrapped from DDP / compile)
        optimizer.pt                       rank 0: backbone optimiser state_dict (replicated by DDP)
        fc_shard_00000-of-00002.pt ...     every rank: the objective's state, e.g. its FC rows + row
                                           optimiser state (arcface.head.shard_checkpoint, resharded on load
                                           by class range; arcface.objectives)
        rng_00000-of-00002.pt ...          every rank: torch / CUDA / numpy / python RNG states
        meta.json                          rank 0, LAST: format version, step, world size, config,
                                           preprocessing contract, and "training": epoch, sampler
                                           position, grad-scaler state, counters

Write protocol (all ranks): rank 0 creates ``.tmp-step_XXXXXXXX`` (removing a stale one left by a crash),
barrier; every rank writes its files (each one temp-named then renamed); barrier; rank 0 checks that
every rank's files are there, writes ``meta.json`` and renames the directory into place; barrier. A
directory named ``step_*`` with a ``meta.json`` is therefore always complete, and ``resume = auto``
(:func:`find_resume_checkpoint`) never picks a half-written one. All ranks must see the same
``output.dir`` (a shared filesystem on several nodes).

Resuming on a different world size: the backbone, its optimiser, the schedule position (the step) and
the sampler position (global samples consumed in the epoch) do not depend on W; the FC shards are
resharded by global class range. Per-rank RNG states (dropout, negative sampling) are restored only
when W is unchanged; otherwise each rank is re-seeded from (seed, step, rank).

Everything is read with ``torch.load(weights_only=True)`` or as JSON: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arcface.checkpoint import (
    BACKBONE_FILE,
    META_FILE,
    STEP_PREFIX,
    CheckpointError,
    find_latest,
    read_meta,
    step_dirname,
    write_meta,
)
from arcface.distributed import barrier, broadcast_object
from arcface.objectives import Objective

__all__ = ["TrainingState", "save_training_checkpoint", "load_training_checkpoint", "find_resume_checkpoint",
           "prune_checkpoints", "unwrap_model", "rng_state", "set_rng_state", "seed_everything",
           "OPTIMIZER_FILE", "CHECKPOINTS_DIR", "TRAINING_KIND"]

OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_KIND = "training"
_RNG_RE = re.compile(r"^rng_(\d{5})-of-(\d{5})\.pt$")


def rng_filename(rank: int, world_size: int) -> str:
    return f"rng_{rank:05d}-of-{world_size:05d}.pt"


@dataclass
class TrainingState:
    """The loop's own progress counters (stored as JSON in ``meta.json["training"]``).

    ``step`` counts optimiser updates done (the schedule position); ``loader`` is the data loader's
    ``state_dict()`` (epoch and global samples consumed); ``scaler`` the grad scaler's state;
    ``best`` the best verification result so far (``{"metric", "value", "step"}``) or empty.
    """

    step: int = 0
    epoch: int = 0
    loader: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    nonfinite_total: int = 0
    best: dict[str, Any] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# -- RNG ------------------------------------------------------------------------------------------------

def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states as plain tensors/numbers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "cuda": None,
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), None))
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and python ``random``."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- save -----------------------------------------------------------------------------------------------

def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_training_checkpoint(checkpoints_dir: str | os.PathLike[str], state: TrainingState, *,
                             backbone: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                             objective_optimizer: torch.optim.Optimizer | None, config: dict[str, Any],
                             rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Path:
    """Write ``checkpoints_dir/step_{state.step:08d}`` collectively; EVERY rank must call it.

    Returns the final directory. An existing checkpoint of the same step is replaced only once the
    new one is complete.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / step_dirname(state.step)
    # One fresh temporary name per save, decided by rank 0: a stale directory from a crashed attempt
    # can never be mistaken for this one's.
    tmp_name = broadcast_object(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    tmp = checkpoints_dir / tmp_name
    if rank == 0:
        tmp.mkdir(parents=True)
    barrier()
    if not tmp.is_dir():
        raise CheckpointError(f"{tmp}: rank {rank} cannot see the checkpoint directory rank 0 created; "
                              "output.dir must be on a filesystem shared by all ranks")
    objective.save(tmp, objective_optimizer)
    _atomic_torch_save(rng_state(device), tmp / rng_filename(rank, world_size))
    if rank == 0:
        _atomic_torch_save(unwrap_model(backbone).state_dict(), tmp / BACKBONE_FILE)
        _atomic_torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    barrier()
    if rank == 0:
        missing = [name for r in range(world_size)
                   for name in (*objective.checkpoint_files(r, world_size), rng_filename(r, world_size))
                   if not (tmp / name).is_file()]
        if missing:
            raise CheckpointError(f"{tmp}: ranks did not write {', '.join(missing[:4])}")
        write_meta(tmp, state.step, config, world_size=world_size,
                   extra={"kind": TRAINING_KIND, "training": _jsonable(asdict(state))})
        if final.exists():
            trash = checkpoints_dir / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
    barrier()
    return final


def _jsonable(value: Any) -> Any:
    """Plain JSON types (numpy / torch scalars from a loader's state_dict become Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic | np.ndarray):
        return _jsonable(value.tolist())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"training state value {value!r} ({type(value).__name__}) is not JSON-serialisable")


def prune_checkpoints(checkpoints_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints, and leftovers of crashed saves.

    Call on rank 0 only, between saves. Returns what was removed.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    complete = sorted(p for p in checkpoints_dir.iterdir()
                      if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / META_FILE).is_file())
    removed = complete[:-keep_last] if keep_last > 0 else complete
    # Temporary directories are only ever alive during a save, and saves are collective: none is
    # in flight when this runs, so any that exist are debris of a killed run.
    removed += [p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# -- load -----------------------------------------------------------------------------------------------

def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike[str]) -> Path | None:
    """What ``output.resume`` points at: ``"none"`` -> None; ``"auto"`` -> the latest complete
    checkpoint in ``output_dir/checkpoints`` (None for a fresh run); a path -> that checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(Path(output_dir) / CHECKPOINTS_DIR)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"output.resume: {path}: no such checkpoint")
    if (path / META_FILE).is_file():
        return path
    latest = find_latest(path) or find_latest(path / CHECKPOINTS_DIR)
    if latest is None:
        raise CheckpointError(f"output.resume: {path}: not a checkpoint directory and none below it")
    return latest


def _torch_load(path: Path, map_location: torch.device | str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the training checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated / corrupted / holds more than plain tensors
        raise CheckpointError(f"{path}: cannot load ({exc})") from exc


def load_training_checkpoint(path: str | os.PathLike[str], *, backbone: nn.Module,
                             optimizer: torch.optim.Optimizer, objective: Objective,
                             objective_optimizer: torch.optim.Optimizer | None, rank: int = 0,
                             world_size: int = 1,
                             device: torch.device | str = "cpu", restore_rng: bool = True
                             ) -> tuple[TrainingState, dict[str, Any]]:
    """Restore a training checkpoint into freshly built objects (every rank calls it).

    Loads the backbone and its optimiser, this rank's objective state (e.g. its FC rows and
    row-optimiser state, resharded when the saving world size differs), and this rank's RNG states
    (same world size only). Returns the loop's :class:`TrainingState` and the checkpoint's metadata
    (``meta["resharded"]`` tells whether the objective's state was resharded). Raises
    :class:`CheckpointError` naming the file on any inconsistency.
    """
    device = torch.device(device)
    meta = read_meta(path)
    directory = Path(meta["_dir"])
    if meta.get("kind") != TRAINING_KIND or "training" not in meta:
        raise CheckpointError(f"{directory / META_FILE}: a backbone-only checkpoint, not a training "
                              "checkpoint (no optimiser / FC state to resume from)")
    try:
        state = TrainingState(**meta["training"])
    except TypeError as exc:
        raise CheckpointError(f"{directory / META_FILE}: malformed 'training' section ({exc})") from exc

    net = unwrap_model(backbone)
    try:
        net.load_state_dict(_torch_load(directory / BACKBONE_FILE, device))
    except RuntimeError as exc:
        raise CheckpointError(f"{directory / BACKBONE_FILE}: does not fit the configured backbone: "
                              f"{exc}") from exc
    try:
        optimizer.load_state_dict(_torch_load(directory / OPTIMIZER_FILE, device))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / OPTIMIZER_FILE}: does not fit the backbone optimiser "
                              f"(optim.name or no_decay_bn_bias_prelu changed?): {exc}") from exc
    meta["resharded"] = objective.load(directory, objective_optimizer)

    saved_world_size = int(meta.get("world_size", 1))
    # A checkpoint imported from another trainer has no RNG states of ours ("rng_saved": false).
    if restore_rng and saved_world_size == world_size and meta.get("rng_saved", True):
        set_rng_state(_torch_load(directory / rng_filename(rank, world_size), "cpu"),
                      device if device.type == "cuda" else None)
    else:
        # A different layout has no per-rank streams to continue: derive fresh, distinct ones.
        seed_everything(int(meta["config"].get("runtime", {}).get("seed", 0)) * 1_000_003
                        + 7919 * state.step + rank)
    return state, meta
