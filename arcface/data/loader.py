"""The training loader: worker processes, pinned memory, the CUDA prefetch stream, resume position."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from arcface.data.dataset import FaceTrainDataset, SyntheticImages
from arcface.data.samplers import DistributedPKSampler, EpochBatches, ResumableDistributedSampler


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
                dataset, batch_sampler=EpochBatches(sampler), collate_fn=collate_uint8,
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
