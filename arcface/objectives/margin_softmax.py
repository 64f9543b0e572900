"""Margin softmax over the sharded Partial FC classifier (ArcFace, CosFace, SphereFace, ... ; the
project's default objective, ``loss.kind = "margin_softmax"``): :class:`arcface.head.partial_fc.PartialFC`
with the margin of ``loss.margin`` (or, with ``loss.head = "lsoftmax"``, the L-Softmax head of
:mod:`arcface.head.lsoftmax`), its row optimiser, and its FC shard files in checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.objectives import Objective, register_objective

__all__ = ["MarginSoftmaxObjective", "build_partial_fc", "build_fc_optimizer_from_config"]


def build_partial_fc(cfg: Any, num_classes: int, rank: int, world_size: int,
                     device: torch.device) -> PartialFC:
    """This rank's Partial FC shard with the configured head (``loss.head``: a cosine margin, or
    L-Softmax), sample rate and update."""
    if cfg.loss.head == "lsoftmax":
        from arcface.head.lsoftmax import LSoftmaxHead

        margin = LSoftmaxHead(**cfg.loss.lsoftmax_kwargs())
    else:
        from arcface.head.margins import build_margin

        margin = build_margin(cfg.loss.margin, **cfg.loss.margin_kwargs())
    return PartialFC(ClassPartition(num_classes, world_size, rank), cfg.backbone.embedding_size, margin,
                     sample_rate=cfg.fc.sample_rate, update=cfg.fc.update, device=device,
                     seed=cfg.runtime.seed)


def build_fc_optimizer_from_config(pfc: PartialFC, cfg: Any, lr: float) -> torch.optim.Optimizer:
    """The shard's row optimiser (``fc.optimizer``), at ``lr * fc.lr_scale``."""
    return pfc.build_optimizer(cfg.fc_optimizer_name(), lr=lr * cfg.fc.lr_scale,
                               momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                               betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


@register_objective
class MarginSoftmaxObjective(Objective):
    """Softmax cross-entropy with a margin over the class-sharded (and optionally sampled) classifier."""

    kind = "margin_softmax"

    def __init__(self, pfc: PartialFC) -> None:
        super().__init__()
        self.pfc = pfc

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> MarginSoftmaxObjective:
        return cls(build_partial_fc(cfg, num_classes, rank, world_size, device))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.pfc(embeddings, labels)

    def build_optimizer(self, cfg: Any, lr: float) -> torch.optim.Optimizer:
        return build_fc_optimizer_from_config(self.pfc, cfg, lr)

    def checkpoint_files(self, rank: int, world_size: int) -> list[str]:
        from arcface.head.shard_checkpoint import shard_filename

        return [shard_filename(rank, world_size)]

    def save(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> None:
        from arcface.head.shard_checkpoint import save_fc_shard

        save_fc_shard(directory, self.pfc, optimizer)

    def load(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> bool:
        from arcface.head.shard_checkpoint import list_fc_shards, load_fc_resharded

        list_fc_shards(directory)  # a clear error when a rank's shard is missing
        return bool(load_fc_resharded(directory, self.pfc, optimizer)["resharded"])

    def describe(self) -> str:
        return (f"margin softmax ({type(self.pfc.margin).__name__}), FC rows on this rank "
                f"{self.pfc.partition.num_local} (sampled {self.pfc.num_sample})")
