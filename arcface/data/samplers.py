"""Resumable distributed samplers: shuffled images, and identity-balanced P x K batches.

Sampler semantics (``data.sampler = "shuffle"``, :class:`ResumableDistributedSampler`): each epoch has
one permutation of all images,
seeded by ``(seed, epoch)`` and identical on every rank. It is cut into consecutive *global* batches of
``world_size * batch_size`` images; rank ``r`` takes the ``r``-th slice of ``batch_size`` of each. The
position saved in a checkpoint is the number of images of the epoch's permutation already handed out
(``consumed``, in global samples), so a resume continues with exactly the images not yet seen. Resuming
with another world size or batch size continues from the same position of the same permutation with the
new global batch: no image of the epoch is repeated or skipped, except the usual dropped tail (fewer
than one global batch) at the end of the epoch.

Identity-balanced batches (``data.sampler = "pk"``, :class:`DistributedPKSampler`): each rank's batch
is P identities x K images, and the ranks' identities within a step are disjoint. An epoch is one
seeded permutation of the identities, cut into global groups of ``world_size * P``; the position saved
is the number of identities of that permutation handed out, so it resumes exactly, also on another
world size or batch size, like the shuffle sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler


class _EpochPosition(Sampler[int]):
    """What the training samplers share: an epoch counter and the position ``consumed`` in it (in the
    sampler's own global units, :attr:`consumed_per_batch` per global batch), moved only by
    :meth:`advance` when a batch reaches the loop, so that a checkpoint's position is exact mid-epoch."""

    epoch: int
    consumed: int
    batch_size: int

    @property
    def consumed_per_batch(self) -> int:  # pragma: no cover - each sampler says what one batch consumes
        raise NotImplementedError

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray]]:  # pragma: no cover
        raise NotImplementedError

    def remaining_batches(self, consumed: int | None = None) -> int:  # pragma: no cover
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        for _, indices in self.iter_batches():
            yield from indices.tolist()

    def __len__(self) -> int:
        return self.remaining_batches() * self.batch_size

    def advance(self, num_batches: int = 1) -> None:
        """Mark ``num_batches`` global batches as consumed; roll over to the next epoch when none is left."""
        self.consumed += num_batches * self.consumed_per_batch
        if self.remaining_batches() == 0:
            self.epoch += 1
            self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; a no-op for the current epoch (keeps a resumed position)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.consumed = 0


class ResumableDistributedSampler(_EpochPosition):
    """Per-epoch seeded shuffle shared by all ranks; rank ``r`` takes slice ``r`` of every global batch.

    The position (``consumed``: samples of the epoch handed out, counted in *global* samples) advances
    only through :meth:`advance`, which the loader calls when a batch reaches the training loop — not
    when workers prefetch it — so :meth:`state_dict` is exact mid-epoch. See the module docstring for
    resuming at another world size.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, batch_size: int,
                 drop_last: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
        if batch_size < 1:
            raise ValueError(f"runtime.batch_size must be >= 1, got {batch_size}")
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples = {num_samples})")
        if drop_last and num_samples < world_size * batch_size:
            raise ValueError(f"the dataset's {num_samples} images do not fill one global batch of "
                             f"{world_size} x runtime.batch_size = {world_size * batch_size}")
        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.consumed = 0

    @property
    def consumed_per_batch(self) -> int:
        return self.global_batch_size

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size

    @property
    def num_images(self) -> int:
        return self.num_samples

    @property
    def samples_per_epoch(self) -> int:
        """The epoch's length in samples (what ``schedule.epochs`` counts): every image once."""
        return self.num_samples

    def describe(self) -> str:
        return (f"sampler: shuffle, one seeded permutation of the {self.num_samples} images per epoch, "
                f"{self.batch_size} per rank and batch")

    def items(self, epoch: int, indices: np.ndarray) -> list[tuple[int, ...]]:
        """The dataset items of one batch: ``(epoch, index)``."""
        return [(epoch, index) for index in indices.tolist()]

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of all image indices (int64), the same on every rank and every run."""
        return np.random.default_rng((self.seed, int(epoch))).permutation(self.num_samples).astype(np.int64)

    def remaining_batches(self, consumed: int | None = None) -> int:
        """Global batches left in the epoch from position ``consumed`` (default: the current one)."""
        left = self.num_samples - (self.consumed if consumed is None else consumed)
        if left <= 0:
            return 0
        return left // self.global_batch_size if self.drop_last else math.ceil(left / self.global_batch_size)

    def batches_per_epoch(self) -> int:
        return self.remaining_batches(0)

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(epoch, this rank's indices)`` per remaining global batch, starting at the current position.

        Without ``drop_last`` the last batch is completed by wrapping around to the epoch's start.
        """
        epoch, start = self.epoch, self.consumed
        order = self.permutation(epoch)
        for batch in range(self.remaining_batches(start)):
            first = start + batch * self.global_batch_size + self.rank * self.batch_size
            positions = np.arange(first, first + self.batch_size) % self.num_samples
            yield epoch, order[positions]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`, possibly at another world size or batch size."""
        if state.get("sampler", "shuffle") != "shuffle":
            raise ValueError(f"the data position was saved with data.sampler = {state['sampler']!r}, this "
                             "run uses data.sampler = 'shuffle': set it back to resume")
        for key in ("epoch", "consumed", "seed", "num_samples"):
            if key not in state:
                raise ValueError(f"sampler state has no {key!r} (keys: {sorted(state)})")
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"sampler state was saved for {state['num_samples']} images, the dataset has "
                             f"{self.num_samples}: the data changed since the checkpoint")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with data.seed = {state['seed']}, the config says "
                             f"{self.seed}: the epoch order would differ")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples or int(state["epoch"]) < 0:
            raise ValueError(f"sampler state position epoch {state['epoch']} consumed {consumed} is out of "
                             f"range for {self.num_samples} images")
        self.epoch = int(state["epoch"])
        self.consumed = consumed
        if self.remaining_batches() == 0:  # saved at the end of an epoch with a larger global batch
            self.epoch += 1
            self.consumed = 0


# Stream tag of the P x K sampler's random draws: apart from the shuffle sampler's (seed, epoch) stream.
_PK_STREAM = 0x504B


class DistributedPKSampler(_EpochPosition):
    """Identity-balanced batches: each rank gets P identities x K images, ranks' identities disjoint.

    Epoch ``e`` is one permutation of the identities, seeded by ``(seed, e)`` and the same on every rank,
    cut into consecutive global groups of ``world_size * P`` identities; rank ``r`` takes the ``r``-th
    ``P`` of each group, so no identity is on two ranks within a step (nor twice in an epoch). An
    identity's K images are drawn by a generator seeded by ``(seed, epoch, identity)``, so they do not
    depend on the world size or on where the identity lands: without replacement when it has at least K
    images; identities with fewer are drawn with replacement (``small_identities = "replace"``) or left
    out of every epoch (``"skip"``). Batches are identity-major (the K images of an identity together).

    The position (``consumed``: identities of the epoch's permutation handed out, counted globally)
    advances through :meth:`advance` only, when a batch reaches the loop, so :meth:`state_dict` is exact
    mid-epoch; a resume at another world size or batch size continues from the same identity of the same
    permutation (the dropped tail, fewer than one global group of identities, aside).
    """

    kind = "pk"

    def __init__(self, labels: np.ndarray, rank: int, world_size: int, seed: int, batch_size: int,
                 images_per_identity: int, small_identities: str = "replace") -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
        k = int(images_per_identity)
        if k < 1:
            raise ValueError(f"data.pk_images_per_identity must be >= 1, got {k}")
        if batch_size < 1 or batch_size % k != 0:
            raise ValueError(f"runtime.batch_size ({batch_size}) must be a positive multiple of "
                             f"data.pk_images_per_identity ({k})")
        if small_identities not in ("replace", "skip"):
            raise ValueError(f"data.pk_small_identities must be 'replace' or 'skip', got "
                             f"{small_identities!r}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"the P x K sampler needs a non-empty 1-D array of integer labels, got shape "
                             f"{labels.shape} dtype {labels.dtype}")
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.batch_size, self.k, self.small_identities = int(batch_size), k, small_identities
        self.num_images = int(labels.size)
        # Images of identity j: order[starts[j] : starts[j] + counts[j]] (dataset order).
        order = np.argsort(labels, kind="stable")
        identities, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self.num_all_identities = int(identities.size)
        small = counts < k
        self.num_small_identities = int(small.sum())
        keep = ~small if small_identities == "skip" else np.ones_like(small)
        self._order = order.astype(np.int32 if self.num_images < 2**31 else np.int64)
        self.identities = identities[keep].astype(np.int64)
        self._starts, self._counts = starts[keep].astype(np.int64), counts[keep].astype(np.int64)
        self.num_identities = int(self.identities.size)
        if self.num_identities < self.global_identities:
            raise ValueError(f"the data has {self.num_identities} identities"
                             f"{f' with >= {k} images' if small_identities == 'skip' else ''}, fewer than "
                             f"one step's world size {world_size} x P = runtime.batch_size / "
                             f"data.pk_images_per_identity = {self.identities_per_batch}")
        self.epoch = 0
        self.consumed = 0

    @property
    def identities_per_batch(self) -> int:
        """P: identities in one rank's batch."""
        return self.batch_size // self.k

    @property
    def consumed_per_batch(self) -> int:
        return self.global_identities

    @property
    def global_identities(self) -> int:
        """Identities in one global batch (all ranks)."""
        return self.world_size * self.identities_per_batch

    @property
    def samples_per_epoch(self) -> int:
        """The epoch's length in samples (what ``schedule.epochs`` counts): K per identity."""
        return self.num_identities * self.k

    def describe(self) -> str:
        small = self.num_small_identities
        what = "drawn with replacement" if self.small_identities == "replace" else "skipped"
        return (f"sampler: P x K, {self.identities_per_batch} identities x {self.k} images per rank and "
                f"batch (identities disjoint across ranks); {self.num_all_identities} identities, {small} of "
                f"them with fewer than {self.k} images ({what}); an epoch visits {self.num_identities} "
                f"identities = {self.samples_per_epoch} samples")

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of identity positions (into :attr:`identities`), the same on every rank."""
        rng = np.random.default_rng((self.seed, int(epoch), _PK_STREAM))
        return rng.permutation(self.num_identities).astype(np.int64)

    def draw(self, epoch: int, position: int) -> np.ndarray:
        """The K image indices of identity ``identities[position]`` in ``epoch``."""
        start, count = int(self._starts[position]), int(self._counts[position])
        rng = np.random.default_rng((self.seed, int(epoch), _PK_STREAM, int(self.identities[position])))
        picks = rng.choice(count, size=self.k, replace=count < self.k)
        return self._order[start + picks].astype(np.int64)

    def remaining_batches(self, consumed: int | None = None) -> int:
        """Global batches left in the epoch from position ``consumed`` (default: the current one)."""
        left = self.num_identities - (self.consumed if consumed is None else consumed)
        return max(left, 0) // self.global_identities

    def batches_per_epoch(self) -> int:
        return self.remaining_batches(0)

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(epoch, this rank's P * K image indices)`` per remaining global batch."""
        epoch, start = self.epoch, self.consumed
        order = self.permutation(epoch)
        p = self.identities_per_batch
        for batch in range(self.remaining_batches(start)):
            first = start + batch * self.global_identities + self.rank * p
            yield epoch, np.concatenate([self.draw(epoch, int(j)) for j in order[first:first + p]])

    def items(self, epoch: int, indices: np.ndarray) -> list[tuple[int, ...]]:
        """The dataset items of one batch: ``(epoch, index, draw)``, draw = the slot among its identity's K
        (a repeated image gets its own augmentation)."""
        return [(epoch, index, slot % self.k) for slot, index in enumerate(indices.tolist())]

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.kind, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_images": self.num_images, "num_identities": self.num_identities,
                "images_per_identity": self.k, "small_identities": self.small_identities,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`, possibly at another world size or batch size."""
        saved_kind = state.get("sampler", "shuffle")
        if saved_kind != self.kind:
            raise ValueError(f"the data position was saved with data.sampler = {saved_kind!r}, this run uses "
                             f"data.sampler = 'pk': set it back to resume")
        for key in ("epoch", "consumed", "seed", "num_images", "num_identities"):
            if key not in state:
                raise ValueError(f"P x K sampler state has no {key!r} (keys: {sorted(state)})")
        if int(state["num_images"]) != self.num_images:
            raise ValueError(f"sampler state was saved for {state['num_images']} images, the dataset has "
                             f"{self.num_images}: the data changed since the checkpoint")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with data.seed = {state['seed']}, the config says "
                             f"{self.seed}: the epoch order would differ")
        if int(state["num_identities"]) != self.num_identities:
            raise ValueError(f"sampler state was saved with {state['num_identities']} identities per epoch, "
                             f"this run has {self.num_identities}: data.pk_images_per_identity or "
                             f"data.pk_small_identities changed which identities are skipped")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_identities or int(state["epoch"]) < 0:
            raise ValueError(f"sampler state position epoch {state['epoch']} consumed {consumed} is out of "
                             f"range for {self.num_identities} identities")
        self.epoch = int(state["epoch"])
        self.consumed = consumed
        if self.remaining_batches() == 0:  # saved at the end of an epoch with a larger global batch
            self.epoch += 1
            self.consumed = 0


class EpochBatches(Sampler[list[tuple[int, ...]]]):
    """Batch sampler for DataLoader: the dataset items of the sampler's remaining batches."""

    def __init__(self, sampler: ResumableDistributedSampler | DistributedPKSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        for epoch, indices in self.sampler.iter_batches():
            yield self.sampler.items(epoch, indices)

    def __len__(self) -> int:
        return self.sampler.remaining_batches()
