"""How the identity classes are split across ranks: a pure value object, no process group needed.

``C`` classes over ``W`` ranks, contiguous and balanced; the first ``C % W`` ranks own one class more::

    num_local(rank) = C // W + (rank < C % W)
    class_start(rank) = rank * (C // W) + min(rank, C % W)

Rank ``r`` owns the global class ids ``[class_start, class_end)``; its FC weight shard row ``i`` is
the centre of global class ``class_start + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassPartition:
    """The contiguous block of classes owned by ``rank`` out of ``world_size`` ranks."""

    num_classes: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        for key in ("num_classes", "world_size", "rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ClassPartition.{key} must be an int, got {type(value).__name__}")
        if self.world_size < 1:
            raise ValueError(f"ClassPartition.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ClassPartition.rank must be in [0, {self.world_size}), got {self.rank}")
        if self.num_classes < self.world_size:
            # Every rank must own at least one class: an empty shard would give an empty weight
            # parameter and a rank with nothing to contribute to the softmax.
            raise ValueError(f"ClassPartition.num_classes ({self.num_classes}) must be >= world_size "
                             f"({self.world_size}) so that every rank owns at least one class")

    @property
    def num_local(self) -> int:
        """Number of classes (weight rows) owned by this rank."""
        return self.num_classes // self.world_size + (self.rank < self.num_classes % self.world_size)

    @property
    def class_start(self) -> int:
        """First global class id owned by this rank."""
        base, extra = divmod(self.num_classes, self.world_size)
        return self.rank * base + min(self.rank, extra)

    @property
    def class_end(self) -> int:
        """One past the last global class id owned by this rank."""
        return self.class_start + self.num_local

    def for_rank(self, rank: int) -> ClassPartition:
        """The partition of the same classes as seen by another rank."""
        return ClassPartition(self.num_classes, self.world_size, rank)

    def all_ranks(self) -> list[ClassPartition]:
        """The partitions of every rank, in rank order."""
        return [self.for_rank(r) for r in range(self.world_size)]

    def owns(self, global_labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask: which of ``global_labels`` belong to this rank."""
        return (global_labels >= self.class_start) & (global_labels < self.class_end)

    def to_local(self, global_labels: torch.Tensor) -> torch.Tensor:
        """Map global class ids to row indices of this rank's shard; ``-1`` where not owned here."""
        local_labels = global_labels - self.class_start
        return torch.where(self.owns(global_labels), local_labels, torch.full_like(local_labels, -1))

    def to_global(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Map row indices of this rank's shard back to global class ids (``-1`` stays ``-1``)."""
        if bool(((local_labels < -1) | (local_labels >= self.num_local)).any()):
            raise ValueError(f"local labels must be in [-1, {self.num_local}) on rank {self.rank}")
        return torch.where(local_labels >= 0, local_labels + self.class_start, local_labels)

    def owner_of(self, global_label: int | torch.Tensor) -> int | torch.Tensor:
        """Rank that owns a global class id (int in, int out; tensor in, int64 tensor out)."""
        base, extra = divmod(self.num_classes, self.world_size)
        # The first ``extra`` ranks own ``base + 1`` classes each and cover [0, boundary).
        boundary = extra * (base + 1)
        if isinstance(global_label, torch.Tensor):
            if bool(((global_label < 0) | (global_label >= self.num_classes)).any()):
                raise ValueError(f"global labels must be in [0, {self.num_classes})")
            global_label = global_label.long()
            big = torch.div(global_label, base + 1, rounding_mode="floor")
            small = extra + torch.div(global_label - boundary, max(base, 1), rounding_mode="floor")
            return torch.where(global_label < boundary, big, small)
        if not 0 <= global_label < self.num_classes:
            raise ValueError(f"global label {global_label} outside [0, {self.num_classes})")
        if global_label < boundary:
            return global_label // (base + 1)
        return extra + (global_label - boundary) // base
