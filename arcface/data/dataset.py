"""Face images for training: the RecordIO dataset with augmentations, and the synthetic in-memory mode."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from arcface.data.augment import Augmenter
from arcface.preprocess import INPUT_SIZE, ImageDecodeError, decode_rgb, ensure_size, to_chw_uint8

_SYNTHETIC_POOL = 1024  # distinct random images behind the synthetic mode (indices wrap around)


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
