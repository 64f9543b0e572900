"""Runs of other trainers, continued here: a small registry of importers chosen by config.

Each importer turns another trainer's saved run into a training checkpoint of ours (the directory
layout of :mod:`arcface.train_state`) in ``output.dir/checkpoints``; the training loop then resumes from it
exactly as from its own checkpoints, on any world size. So the loop has one call,
:func:`import_configured_run`, and never branches on where a run came from:

========================================  ==================================================================
config key                                importer
========================================  ==================================================================
``output.resume_from_insightface = DIR``  :func:`~arcface.interop.insightface_resume.import_insightface_run`
========================================  ==================================================================

The import happens once: when ``output.dir/checkpoints`` already holds a checkpoint (the import itself,
or anything trained after it), that checkpoint is resumed and the foreign run is not read again, so a
preempted job restarted with the same command continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from arcface.checkpoint import CheckpointError, find_latest
from arcface.config import TrainConfig
from arcface.distributed import broadcast_object

__all__ = ["RUN_IMPORTERS", "import_configured_run"]


def _insightface(cfg: TrainConfig, source: str, checkpoints_dir: Path, **context: Any) -> str:
    from arcface.interop.insightface_resume import import_insightface_run

    return import_insightface_run(cfg, source, checkpoints_dir, **context)


# output.<key> -> importer(cfg, source, checkpoints_dir, num_images=, num_classes=, loader_state=,
# world_size=) -> a line for the log
RUN_IMPORTERS: dict[str, Callable[..., str]] = {
    "resume_from_insightface": _insightface,
}


def import_configured_run(cfg: TrainConfig, checkpoints_dir: str | Path, *, num_images: int, num_classes: int,
                          loader_state: dict[str, Any], rank: int, world_size: int) -> str:
    """Import the run named by the config, if any, once; collective (every rank calls it).

    Rank 0 reads and writes; every rank gets its outcome, so all of them raise the same
    :class:`CheckpointError` on a bad run instead of waiting for a rank that failed. Returns the log
    line ("" when no foreign run is configured).
    """
    configured = [(key, getattr(cfg.output, key)) for key in RUN_IMPORTERS if getattr(cfg.output, key)]
    if not configured:
        return ""
    key, source = configured[0]
    outcome: tuple[str, str | None] = ("", None)
    if rank == 0:
        latest = find_latest(checkpoints_dir)
        if latest is not None:
            outcome = (f"output.{key}: {source} not read again: resuming {latest} (this run's own "
                       "checkpoints take precedence once they exist)", None)
        else:
            try:
                outcome = (RUN_IMPORTERS[key](cfg, source, Path(checkpoints_dir), num_images=num_images,
                                              num_classes=num_classes, loader_state=loader_state,
                                              world_size=world_size), None)
            except (CheckpointError, ValueError, OSError) as exc:
                outcome = ("", f"output.{key}: {exc}")
    note, error = broadcast_object(outcome if rank == 0 else None)
    if error is not None:
        raise CheckpointError(error)
    return note
