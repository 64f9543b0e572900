"""Training data: RecordIO face dataset with augmentations, a resumable distributed sampler, the loader.

Data path of one step::

    sampler (main process) -> worker processes: read record, decode (arcface.preprocess.decode_rgb),
    augment (numpy/cv2), uint8 CHW -> collate -> [pinned memory] -> device copy (CUDA: side stream,
    one batch ahead) -> the loop normalises on the device (arcface.preprocess.normalize)

Only ``uint8`` crosses the host-to-device copy (4x fewer bytes than float32).

Determinism: the random choices of an augmentation are drawn from a generator seeded by
``(data.seed, epoch, image index)``, so a batch is the same whichever worker decodes it, however many
workers there are, and after a resume.

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
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from arcface.preprocess import INPUT_SIZE, ImageDecodeError, decode_rgb, ensure_size, to_chw_uint8

__all__ = ["Augmenter", "FaceTrainDataset", "ResumableDistributedSampler", "DistributedPKSampler",
           "SyntheticImages", "TrainLoader", "CudaPrefetcher", "build_train_loader", "collate_uint8"]

_SYNTHETIC_POOL = 1024  # distinct random images behind the synthetic mode (indices wrap around)


# -- augmentations -------------------------------------------------------------------------------------

class Augmenter:
    """Random image augmentations on ``HxWx3`` ``uint8`` RGB arrays (numpy/cv2, run in the workers).

    Order: random resized crop, low resolution, blur, colour jitter, grayscale, horizontal flip. Each is
    off by default; :meth:`from_config` reads a ``DataConfig``-like object (``flip``,
    ``random_resized_crop``, ``crop_scale_min``, ``color_jitter``, ``grayscale_prob``, ``blur_prob``,
    ``low_res_prob``, ``low_res_min_size``; missing attributes mean "off").
    """

    def __init__(self, flip: bool = False, random_resized_crop: bool = False, crop_scale_min: float = 0.8,
                 color_jitter: float = 0.0, grayscale_prob: float = 0.0, blur_prob: float = 0.0,
                 low_res_prob: float = 0.0, low_res_min_size: int = 16) -> None:
        self.flip = bool(flip)
        self.random_resized_crop = bool(random_resized_crop)
        self.crop_scale_min = float(crop_scale_min)
        self.color_jitter = float(color_jitter)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.low_res_prob = float(low_res_prob)
        self.low_res_min_size = int(low_res_min_size)

    @classmethod
    def from_config(cls, augment: Any) -> Augmenter:
        names = ("flip", "random_resized_crop", "crop_scale_min", "color_jitter", "grayscale_prob",
                 "blur_prob", "low_res_prob", "low_res_min_size")
        defaults = cls()
        return cls(**{name: getattr(augment, name, getattr(defaults, name)) for name in names})

    @property
    def active(self) -> bool:
        return (self.flip or self.random_resized_crop or self.color_jitter > 0 or self.grayscale_prob > 0
                or self.blur_prob > 0 or self.low_res_prob > 0)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = rgb.shape[0]
        if self.random_resized_crop:
            rgb = self._resized_crop(rgb, rng)
        if self.low_res_prob > 0 and rng.random() < self.low_res_prob:
            # Downscale with area averaging (what a low-resolution camera would record), then back up
            # with bilinear interpolation (what the deployment pipeline does to small faces).
            low = int(rng.integers(self.low_res_min_size, max(self.low_res_min_size, size // 2) + 1))
            small = cv2.resize(rgb, (low, low), interpolation=cv2.INTER_AREA)
            rgb = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
        if self.blur_prob > 0 and rng.random() < self.blur_prob:
            rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=float(rng.uniform(0.5, 2.0)))
        if self.color_jitter > 0:
            rgb = self._jitter(rgb, rng)
        if self.grayscale_prob > 0 and rng.random() < self.grayscale_prob:
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            rgb = np.repeat(gray[:, :, None], 3, axis=2)
        if self.flip and rng.random() < 0.5:
            rgb = rgb[:, ::-1]
        return np.ascontiguousarray(rgb)

    def _resized_crop(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = rgb.shape[:2]
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(self.crop_scale_min, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_w = int(round(math.sqrt(target * aspect)))
            crop_h = int(round(math.sqrt(target / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                crop = rgb[top:top + crop_h, left:left + crop_w]
                return cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
        return rgb  # no valid crop drawn (only for extreme aspect settings): keep the image whole

    def _jitter(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.color_jitter
        brightness, contrast, saturation = rng.uniform(1 - s, 1 + s, size=3)
        image = rgb.astype(np.float32) * brightness
        gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = (image - gray.mean()) * contrast + gray.mean()
        gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = (image - gray[..., None]) * saturation + gray[..., None]
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# -- dataset -------------------------------------------------------------------------------------------

class FaceTrainDataset(Dataset):
    """Map-style dataset of ``(uint8 CHW RGB tensor [3, 112, 112], int label)`` over a RecordIO dataset.

    ``source`` is anything ``recordio_tools.dataset.open_dataset`` accepts or an opened
    ``FaceRecordDataset``. Items are indexed by image index, or by ``(epoch, index)`` (what
    :class:`TrainLoader` passes, so that workers need no epoch state): the augmentation generator is
    seeded by ``(seed, epoch, index)``. The P x K sampler passes ``(epoch, index, draw)`` (``draw`` = the
    image's slot among its identity's K), so an image drawn twice gets two different augmentations.
    """

    def __init__(self, source: Any, augment: Any = None, seed: int | None = None) -> None:
        if isinstance(source, str | os.PathLike):
            from recordio_tools.dataset import open_dataset

            source = open_dataset(source)
        self.records = source
        self.augmenter = Augmenter.from_config(augment) if augment is not None else Augmenter()
        self.seed = int(seed if seed is not None else getattr(augment, "seed", 0))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return int(self.records.num_classes)

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels

    def __getitem__(self, item: int | tuple[int, ...]) -> tuple[torch.Tensor, int]:
        epoch, index, *draw = item if isinstance(item, tuple) else (self.epoch, item)
        index = int(index)
        data = self.records.read_image(index)
        try:
            rgb = decode_rgb(data)
        except ImageDecodeError as exc:
            # Locate the record only on failure (describe() is not free on multi-shard datasets).
            raise ImageDecodeError(f"{self.records.describe(index)}: {str(exc).split(': ', 1)[-1]}") from None
        rgb = ensure_size(rgb, INPUT_SIZE)
        if self.augmenter.active:
            rgb = self.augmenter(rgb, np.random.default_rng((self.seed, int(epoch), index, *map(int, draw))))
        return to_chw_uint8(rgb), int(self.records.labels[index])


# -- sampler -------------------------------------------------------------------------------------------

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


class _EpochBatches(Sampler[list[tuple[int, ...]]]):
    """Batch sampler for DataLoader: the dataset items of the sampler's remaining batches."""

    def __init__(self, sampler: ResumableDistributedSampler | DistributedPKSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        for epoch, indices in self.sampler.iter_batches():
            yield self.sampler.items(epoch, indices)

    def __len__(self) -> int:
        return self.sampler.remaining_batches()


# -- synthetic in-memory data --------------------------------------------------------------------------

class SyntheticImages:
    """Fixed random ``uint8`` images and labels held on the device (speed tests: no decoding, no copy).

    Image ``i`` is pool image ``i % pool_size``; its label is ``i % num_classes``.
    """

    def __init__(self, num_images: int, num_classes: int, seed: int, device: torch.device,
                 pool_size: int = _SYNTHETIC_POOL) -> None:
        generator = torch.Generator().manual_seed(seed)
        pool = min(num_images, pool_size)
        self.num_images = int(num_images)
        self.num_classes = int(num_classes)
        self.images = torch.randint(0, 256, (pool, 3, INPUT_SIZE, INPUT_SIZE), generator=generator,
                                    dtype=torch.uint8).to(device)
        self.device = device

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(indices).to(self.device)
        return self.images.index_select(0, index % self.images.shape[0]), index % self.num_classes


# -- device transfer -----------------------------------------------------------------------------------

class CudaPrefetcher:
    """Copy the next host batch to the GPU on a side stream while the current step computes.

    The consumer's stream waits for the copy before using a batch, and ``record_stream`` tells the
    caching allocator that the batch is used on the consumer's stream, so its memory is not reused early.
    """

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.next_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._preload()

    def _preload(self) -> None:
        try:
            images, labels = next(self.batches)
        except StopIteration:
            self.next_batch = None
            return
        with torch.cuda.stream(self.stream):
            self.next_batch = (images.to(self.device, non_blocking=True),
                               labels.to(self.device, non_blocking=True))

    def __iter__(self) -> CudaPrefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.next_batch is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        images, labels = self.next_batch
        images.record_stream(current)
        labels.record_stream(current)
        self._preload()
        return images, labels


def collate_uint8(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(uint8 CHW image, label)`` items into ``(uint8 [b, 3, H, W], int64 [b])``.

    numpy's single-threaded copy instead of ``torch.stack``: with ``num_workers = 0`` collation runs in
    the training process, whose intra-op thread pool makes a 2 MB stack hundreds of times slower on
    busy machines (measured: 3 ms with one thread, 770 ms with two contended threads).
    """
    images = torch.from_numpy(np.stack([image.numpy() for image, _ in batch]))
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return images, labels


def _worker_init(worker_id: int) -> None:
    # One thread per worker: parallelism comes from the workers; more threads only oversubscribe cores.
    # (OpenCV is already single-threaded here: see _prepare_fork.)
    torch.set_num_threads(1)
    # Schedulers and torchrun stop a job by signalling its whole process group, loader workers included.
    # A worker killed by SIGTERM makes the training process raise before it can write its preemption
    # checkpoint, so workers leave stopping to it: it checkpoints, then shuts them down (and they exit on
    # their own if it dies).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_fork() -> None:
    """Make OpenCV single-threaded in this process before DataLoader forks its workers.

    OpenCV's thread pool is not fork-safe: a worker forked while the parent's pool exists inherits its
    locks but not its threads, and deadlocks in its first threaded call (even ``cv2.setNumThreads``).
    Shrinking the pool in the parent joins its threads first, so the children start clean. The cost is
    a single-threaded OpenCV in the training process, which does no heavy image work itself.
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


# -- the loader ----------------------------------------------------------------------------------------

class TrainLoader:
    """Iterates ``(images uint8 [b, 3, 112, 112], labels int64 [b])`` on ``device`` for one rank.

    ``iter(loader)`` yields the rest of the current epoch; when it is exhausted the position has moved
    to the start of the next epoch. :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    exact position (see :class:`ResumableDistributedSampler`). ``last_wait_seconds`` is the time the
    loop waited for the last batch, ``total_wait_seconds`` the sum since construction.
    """

    def __init__(self, sampler: ResumableDistributedSampler | DistributedPKSampler, device: torch.device,
                 num_classes: int, steps_per_epoch: int, source: str, dataset: FaceTrainDataset | None = None,
                 synthetic: SyntheticImages | None = None, num_workers: int = 0) -> None:
        self.sampler = sampler
        self.device = torch.device(device)
        self.num_classes = int(num_classes)
        self.num_images = sampler.num_images
        #: the epoch's length in samples (every image once; identities x K with the P x K sampler)
        self.samples_per_epoch = sampler.samples_per_epoch
        self.steps_per_epoch = int(steps_per_epoch)
        self.source = source
        self.dataset = dataset
        self.synthetic = synthetic
        self.last_wait_seconds = 0.0
        self.total_wait_seconds = 0.0
        self._loader: DataLoader | None = None
        if dataset is not None:
            self._loader = DataLoader(
                dataset, batch_sampler=_EpochBatches(sampler), collate_fn=collate_uint8,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers > 0 else None,
                worker_init_fn=_worker_init if num_workers > 0 else None,
            )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank (``steps_per_epoch`` counts optimiser updates)."""
        return self.sampler.batches_per_epoch()

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.sampler.remaining_batches()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> str:
        """One line about the sampler for the start of the training log."""
        return self.sampler.describe()

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.synthetic is not None:
            for _, indices in self.sampler.iter_batches():
                yield self.synthetic.batch(indices)
        else:
            assert self._loader is not None
            if self._loader.num_workers > 0:
                _prepare_fork()
            yield from self._loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = self._host_batches()
        on_cuda = self.device.type == "cuda" and self.synthetic is None
        if on_cuda:
            batches = CudaPrefetcher(batches, self.device)
        while True:
            started = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            if not on_cuda and images.device != self.device:
                images, labels = images.to(self.device), labels.to(self.device)
            self.last_wait_seconds = time.perf_counter() - started
            self.total_wait_seconds += self.last_wait_seconds
            self.sampler.advance(1)
            yield images, labels

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()  # type: ignore[attr-defined]
            self._loader._iterator = None


def build_train_loader(cfg: Any, rank: int, world_size: int, device: torch.device | str) -> TrainLoader:
    """The training loader of ``rank`` for ``cfg`` (a :class:`arcface.config.TrainConfig`).

    Validates that ``cfg.data.num_classes`` (when non-zero) matches the data, and that one global batch
    fits in the dataset. ``data.sampler`` chooses the sampler: ``"shuffle"``
    (:class:`ResumableDistributedSampler`) or ``"pk"`` (:class:`DistributedPKSampler`, over the labels
    the RecordIO index already holds: no image is decoded to find them).
    """
    device = torch.device(device)
    data = cfg.data
    if data.synthetic:
        num_images, num_classes, source = data.synthetic_num_images, data.num_classes, "synthetic"
        synthetic = SyntheticImages(num_images, num_classes, data.seed, device)
        dataset = None
    else:
        if not data.rec:
            raise ValueError("data.rec is empty: set it to a dataset (.rec, prefix, folder or shard "
                             "manifest) or set data.synthetic = true")
        dataset = FaceTrainDataset(data.rec, data, seed=data.seed)
        num_images, num_classes, source = len(dataset), dataset.num_classes, dataset.records.source
        if data.num_classes and data.num_classes != num_classes:
            raise ValueError(f"data.num_classes = {data.num_classes} but {source} has {num_classes} classes "
                             f"(labels 0..{num_classes - 1}); set data.num_classes = {num_classes}, or 0 to "
                             f"take it from the data")
        synthetic = None
    sampler: ResumableDistributedSampler | DistributedPKSampler
    if data.sampler == "pk":
        # The labels come from the RecordIO index and headers read when the dataset was opened.
        labels = dataset.labels if dataset is not None else np.arange(num_images) % num_classes
        sampler = DistributedPKSampler(labels, rank, world_size, data.seed, cfg.runtime.batch_size,
                                       data.pk_images_per_identity, data.pk_small_identities)
    else:
        sampler = ResumableDistributedSampler(num_images, rank, world_size, data.seed, cfg.runtime.batch_size)
    steps_per_epoch = cfg.steps_per_epoch(sampler.samples_per_epoch, world_size)
    return TrainLoader(sampler, device, num_classes, steps_per_epoch, source, dataset=dataset,
                       synthetic=synthetic, num_workers=data.num_workers)
