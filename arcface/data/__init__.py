"""Training data: RecordIO face dataset with augmentations, resumable distributed samplers, the loader.

Modules: :mod:`~arcface.data.augment`, :mod:`~arcface.data.dataset`, :mod:`~arcface.data.samplers`
(plus the single-process :mod:`~arcface.data.pk_batch_sampler`) and :mod:`~arcface.data.loader`.

Data path of one step::

    sampler (main process) -> worker processes: read record, decode (arcface.preprocess.decode_rgb),
    augment (numpy/cv2), uint8 CHW -> collate -> [pinned memory] -> device copy (CUDA: side stream,
    one batch ahead) -> the loop normalises on the device (arcface.preprocess.normalize)

Only ``uint8`` crosses the host-to-device copy (4x fewer bytes than float32).

Determinism: the random choices of an augmentation are drawn from a generator seeded by
``(data.seed, epoch, image index)``, so a batch is the same whichever worker decodes it, however many
workers there are, and after a resume.
"""

from arcface.data.augment import Augmenter
from arcface.data.dataset import FaceTrainDataset, SyntheticImages
from arcface.data.loader import CudaPrefetcher, TrainLoader, build_train_loader, collate_uint8
from arcface.data.pk_batch_sampler import PKBatchSampler
from arcface.data.samplers import DistributedPKSampler, ResumableDistributedSampler

__all__ = ["Augmenter", "FaceTrainDataset", "ResumableDistributedSampler", "DistributedPKSampler",
           "PKBatchSampler", "SyntheticImages", "TrainLoader", "CudaPrefetcher", "build_train_loader",
           "collate_uint8"]
