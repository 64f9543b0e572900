"""The training objective: one seat in the loop for every loss family the project trains.

The loop (:func:`arcface.train.train`) knows only this interface. An :class:`Objective` receives the
embeddings and labels of this rank's micro-batch and returns the loss of the GLOBAL batch (the same
value on every rank); it owns whatever the loss needs beyond the backbone (a class-sharded classifier,
class centres, learnable margins), builds the optimiser of those parameters, and writes and reads
their state in training checkpoints (each rank its own files, resharded on load where the state is
split by class).

Gradient contract, for every objective: the gradient each rank receives for its local embeddings is
exactly the gradient of the global-batch loss (the dense single-process gradient). The trainer puts
``arcface.distributed.scale_gradient(embeddings, W)`` in front of the objective, which cancels DDP's
averaging of backbone gradients over the W ranks; backbone gradients then equal one process's on the
whole global batch.

Which objective runs is ``loss.kind`` (:data:`arcface.config.OBJECTIVE_KINDS`); :func:`build_objective`
builds it from the typed config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Objective", "build_objective", "register_objective", "objective_kinds"]


class Objective(nn.Module):
    """Base class of training objectives (see the module docstring for the contract)."""

    #: the ``loss.kind`` that selects it
    kind: ClassVar[str] = ""

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> Objective:
        """Build from the typed config (:class:`arcface.config.TrainConfig`) for this rank."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``embeddings [b, D]`` (any float dtype) and global class ids ``labels [b]`` of this rank's
        micro-batch -> the 0-dim fp32 loss of the global batch, identical on every rank."""
        raise NotImplementedError

    def build_optimizer(self, cfg: Any, lr: float) -> torch.optim.Optimizer | None:
        """The optimiser of the objective's own parameters (None when it has none). The loop sets its
        learning rate each update to ``lr * fc.lr_scale`` (times a param group's ``"lr_scale"``)."""
        return None

    def checkpoint_files(self, rank: int, world_size: int) -> list[str]:
        """Names of the files rank ``rank`` of ``world_size`` writes into a checkpoint (checked for
        completeness before the checkpoint is published)."""
        return []

    def save(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> None:
        """Write this rank's state (parameters and their optimiser state) into ``directory``."""

    def load(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> bool:
        """Read this rank's state back from a checkpoint saved on any world size; True when it had to be
        resharded. Raises ``arcface.checkpoint.CheckpointError`` naming the file on any problem."""
        return False

    def log_values(self) -> dict[str, float]:
        """Scalars of the last forward worth logging next to the loss (e.g. the share of active
        triplets); read on logging steps only."""
        return {}

    def describe(self) -> str:
        """One line for the start of the training log."""
        return self.kind


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable as ``loss.kind = cls.kind``."""
    if not cls.kind or cls.kind in _REGISTRY:
        raise ValueError(f"objective kind {cls.kind!r} is empty or registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def objective_kinds() -> tuple[str, ...]:
    """Every registered ``loss.kind``."""
    _import_builtins()
    return tuple(_REGISTRY)


def build_objective(cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> Objective:
    """The objective ``cfg.loss.kind`` for this rank, on ``device``."""
    _import_builtins()
    kind = cfg.loss.kind
    if kind not in _REGISTRY:
        raise ValueError(f"loss.kind must be one of {', '.join(repr(k) for k in _REGISTRY)}, got {kind!r}")
    return _REGISTRY[kind].from_config(cfg, num_classes, rank, world_size, device)


def _import_builtins() -> None:
    # The built-in objectives register themselves on import.
    from arcface.objectives import joint, margin_softmax, pairwise  # noqa: F401, I001
    from arcface.objectives import center_loss  # noqa: F401
