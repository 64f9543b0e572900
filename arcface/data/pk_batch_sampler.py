"""Identity-balanced P x K batch sampler for metric-learning losses (triplet, TriHard, lifted, margin).

Online mining needs several images of each identity in the same batch: every batch here holds ``P``
distinct identities with ``K`` images each (``P * K`` indices, identity-major order). Per epoch the
eligible identities are shuffled and cut into groups of P, so each identity appears in at most one batch
per epoch; its K images are drawn without replacement when it has at least K, with replacement otherwise
(duplicates are then unavoidable; ``min_images`` can exclude small identities instead).

Deterministic: the order depends only on ``(seed, epoch)``; call :meth:`set_epoch` each epoch. With
``num_replicas > 1`` rank r takes batches ``r, r + W, ...`` of the same global order, every rank the same
number of batches (the remainder is dropped), so ranks never share an identity within a step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class PKBatchSampler:
    """Yields lists of ``P * K`` dataset indices: P identities x K images (use as ``batch_sampler``)."""

    def __init__(self, labels: Sequence[int] | np.ndarray, p: int, k: int, *, seed: int = 0,
                 min_images: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D array of identity ids, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        if min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got num_replicas="
                             f"{num_replicas}, rank={rank}")
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        order = np.argsort(labels, kind="stable")
        identities, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        eligible = counts >= min_images
        self.identities = identities[eligible]
        # index lists per identity, in dataset order
        self._members = [order[s:s + c] for s, c, ok in zip(starts, counts, eligible, strict=True) if ok]
        if len(self.identities) < self.p:
            raise ValueError(f"P={self.p} identities per batch but only {len(self.identities)} identities "
                             f"have >= {min_images} images")

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (the same on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (len(self.identities) // self.p) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.identities))
        num_global = len(self) * self.num_replicas
        for b in range(num_global):
            # every rank draws the same images for every batch (same rng stream), keeps only its own
            batch: list[int] = []
            for ident in perm[b * self.p:(b + 1) * self.p]:
                members = self._members[ident]
                replace = len(members) < self.k
                batch.extend(int(i) for i in rng.choice(members, size=self.k, replace=replace))
            if b % self.num_replicas == self.rank:
                yield batch
