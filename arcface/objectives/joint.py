"""Joint identification-verification (DeepID2, ``loss.kind = "softmax+contrastive"``):
``loss = identification + loss.joint_weight * verification``.

The identification signal is the sharded Partial FC softmax of :mod:`arcface.objectives.margin_softmax`
(``loss.margin = "softmax"`` for DeepID2's plain softmax over identities; any other margin preset
works too), so it scales to millions of identities exactly like the default objective: the same FC
shard files in checkpoints, resharded on load, and the same row optimiser. The verification signal is
:class:`arcface.objectives.pairwise.ContrastiveObjective` over every pair of the global batch. Both
parts honour the gradient contract of :mod:`arcface.objectives` on their own (each gives every rank
the exact gradient of its global-batch term), so their weighted sum does too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from arcface.head.partial_fc import PartialFC
from arcface.objectives import Objective, register_objective
from arcface.objectives.margin_softmax import MarginSoftmaxObjective, build_partial_fc
from arcface.objectives.pairwise import ContrastiveObjective

__all__ = ["SoftmaxContrastiveObjective"]


@register_objective
class SoftmaxContrastiveObjective(Objective):
    """DeepID2's joint identification (sharded softmax) + verification (contrastive) signals."""

    kind = "softmax+contrastive"

    def __init__(self, identification: MarginSoftmaxObjective, verification: ContrastiveObjective,
                 weight: float) -> None:
        super().__init__()
        if not weight > 0:
            raise ValueError(f"loss.joint_weight must be > 0, got {weight}")
        self.identification, self.verification, self.weight = identification, verification, float(weight)
        self._parts: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> SoftmaxContrastiveObjective:
        identification = MarginSoftmaxObjective(build_partial_fc(cfg, num_classes, rank, world_size, device))
        verification = ContrastiveObjective.from_config(cfg, num_classes, rank, world_size, device)
        return cls(identification, verification, cfg.loss.joint_weight)

    @property
    def pfc(self) -> PartialFC:
        """The identification part's FC shard."""
        return self.identification.pfc

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        identification = self.identification(embeddings, labels)
        verification = self.verification(embeddings, labels)
        self._parts = {"identification": identification.detach(), "verification": verification.detach()}
        return identification + self.weight * verification

    # The FC shard is the only state: optimiser and checkpoint files exactly as margin_softmax's.
    def build_optimizer(self, cfg: Any, lr: float) -> torch.optim.Optimizer:
        return self.identification.build_optimizer(cfg, lr)

    def checkpoint_files(self, rank: int, world_size: int) -> list[str]:
        return self.identification.checkpoint_files(rank, world_size)

    def save(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> None:
        self.identification.save(directory, optimizer)

    def load(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> bool:
        return self.identification.load(directory, optimizer)

    def log_values(self) -> dict[str, float]:
        return {**{key: float(value) for key, value in self._parts.items()}, **self.verification.log_values()}

    def describe(self) -> str:
        return (f"joint identification + {self.weight:g} x verification (DeepID2): "
                f"{self.identification.describe()}; {self.verification.describe()}")
