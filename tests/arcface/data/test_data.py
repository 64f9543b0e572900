"""Training data: decoded images against the encoded originals, augmentations, exact sampler resume."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from arcface.config import TrainConfig, load_config
from arcface.data import Augmenter, FaceTrainDataset, ResumableDistributedSampler, build_train_loader
from arcface.preprocess import ImageDecodeError
from recordio_tools.writer import FaceDatasetWriter
from tests.paths import ROOT

NUM_CLASSES, PER_CLASS = 4, 6


def _face(rng: np.random.Generator) -> np.ndarray:
    """A smooth random RGB image (blurred noise: realistic enough for blur/low-res properties)."""
    noise = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 1.0)


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], list[int]]:
    """A 24-image InsightFace-layout .rec with lossless PNG images (so decoding is exactly checkable)."""
    folder = tmp_path_factory.mktemp("tiny_rec")
    rng = np.random.default_rng(0)
    writer = FaceDatasetWriter(folder / "train", layout="insightface", num_classes=NUM_CLASSES)
    images, labels = [], []
    for label in range(NUM_CLASSES):
        for _ in range(PER_CLASS):
            rgb = _face(rng)
            ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            assert ok
            writer.add(label, png.tobytes())
            images.append(rgb)
            labels.append(label)
    writer.close()
    return folder / "train.rec", images, labels


def _cfg(rec: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"data.rec={rec}", "data.num_workers=0", "runtime.batch_size=4", *overrides])


# -- dataset and augmentations ------------------------------------------------------------------------

def test_dataset_decodes_exactly_the_packed_images(tiny_rec):
    rec, images, labels = tiny_rec
    dataset = FaceTrainDataset(rec, augment=None)
    assert len(dataset) == len(images) and dataset.num_classes == NUM_CLASSES
    for index in (0, 7, 23):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 112, 112)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), images[index])
        assert label == labels[index]


def test_undecodable_record_names_file_and_key(tmp_path: Path):
    writer = FaceDatasetWriter(tmp_path / "bad", layout="plain")
    ok, png = cv2.imencode(".png", np.zeros((112, 112, 3), np.uint8))
    writer.add(0, png.tobytes())
    writer.add(1, b"definitely not an image")
    writer.close()
    dataset = FaceTrainDataset(tmp_path / "bad.rec")
    dataset[0]
    with pytest.raises(ImageDecodeError, match=r"bad\.rec key 1: image data does not decode"):
        dataset[1]


def test_flip_is_seeded_per_epoch_and_index(tiny_rec):
    rec, images, _ = tiny_rec
    dataset = FaceTrainDataset(rec, augment=Augmenter(flip=True), seed=5)
    flipped = {}
    for epoch in (0, 1):
        for index in range(len(images)):
            out = dataset[(epoch, index)][0].permute(1, 2, 0).numpy()
            is_flipped = np.array_equal(out, images[index][:, ::-1])
            assert is_flipped or np.array_equal(out, images[index])
            assert torch.equal(dataset[(epoch, index)][0], dataset[(epoch, index)][0])  # reproducible
            flipped[epoch, index] = is_flipped
    per_epoch = [[flipped[e, i] for i in range(len(images))] for e in (0, 1)]
    assert 0 < sum(per_epoch[0]) < len(images) and per_epoch[0] != per_epoch[1]


def test_grayscale_matches_cv2_luma(tiny_rec):
    _, images, _ = tiny_rec
    out = Augmenter(grayscale_prob=1.0)(images[0], np.random.default_rng(0))
    gray = cv2.cvtColor(images[0], cv2.COLOR_RGB2GRAY)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def _sharpness(rgb: np.ndarray) -> float:
    return float(np.abs(cv2.Laplacian(rgb.astype(np.float32), cv2.CV_32F)).mean())


def test_blur_and_low_resolution_remove_detail(tiny_rec):
    _, images, _ = tiny_rec
    for augment in (Augmenter(blur_prob=1.0), Augmenter(low_res_prob=1.0, low_res_min_size=16)):
        for seed in range(3):
            out = augment(images[seed], np.random.default_rng(seed))
            assert out.shape == images[seed].shape and out.dtype == np.uint8
            assert _sharpness(out) < 0.8 * _sharpness(images[seed])


def test_color_jitter_stays_within_its_strength():
    flat = np.full((112, 112, 3), 100, np.uint8)  # grey: saturation and contrast leave it unchanged
    for seed in range(20):
        out = Augmenter(color_jitter=0.2)(flat, np.random.default_rng(seed))
        assert len(np.unique(out)) == 1 and 80 <= out[0, 0, 0] <= 120  # brightness factor in [0.8, 1.2]


def test_random_resized_crop_keeps_a_monotone_ramp_monotone():
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 112).astype(np.uint8)[None, :, None], 112, 0), 3, 2)
    spans = []
    for seed in range(5):
        out = Augmenter(random_resized_crop=True, crop_scale_min=0.5)(ramp, np.random.default_rng(seed))
        row = out[50, :, 0].astype(int)
        assert out.shape == ramp.shape and np.all(np.diff(row) >= 0)
        spans.append(row[-1] - row[0])
    assert max(spans) <= 255 and min(spans) < 230  # crops zoom in: the visible part of the ramp shrinks


# -- sampler ------------------------------------------------------------------------------------------

def _epoch_batches(sampler: ResumableDistributedSampler) -> list[list[int]]:
    batches = []
    for _, indices in sampler.iter_batches():
        batches.append(indices.tolist())
        sampler.advance(1)
    return batches


@pytest.mark.parametrize("num_samples, world_size, batch_size", [(100, 2, 8), (37, 3, 4), (64, 1, 64)])
def test_ranks_partition_the_single_process_batch(num_samples, world_size, batch_size):
    """Rank slices of a global batch, concatenated, are the batch of one process with the global size."""
    single = _epoch_batches(ResumableDistributedSampler(num_samples, 0, 1, 7, world_size * batch_size))
    per_rank = [_epoch_batches(ResumableDistributedSampler(num_samples, r, world_size, 7, batch_size))
                for r in range(world_size)]
    assert len(single) == num_samples // (world_size * batch_size)
    for step, batch in enumerate(single):
        assert sum((per_rank[r][step] for r in range(world_size)), []) == batch
    seen = [i for batch in single for i in batch]
    assert len(set(seen)) == len(seen) and set(seen) <= set(range(num_samples))


def test_epochs_reshuffle_and_seed_is_reproducible():
    a = ResumableDistributedSampler(50, 0, 1, seed=1, batch_size=10)
    b = ResumableDistributedSampler(50, 0, 1, seed=1, batch_size=10)
    first = _epoch_batches(a)
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["consumed"] == 0  # rolled over
    assert _epoch_batches(b) == first
    assert _epoch_batches(a) != first  # epoch 1 has another order
    assert sorted(sum(first, [])) == list(range(50))


def test_mid_epoch_resume_is_exact():
    reference = ResumableDistributedSampler(90, 1, 2, seed=3, batch_size=5)
    uninterrupted = _epoch_batches(reference)
    interrupted = ResumableDistributedSampler(90, 1, 2, seed=3, batch_size=5)
    iterator = interrupted.iter_batches()
    for _ in range(4):
        next(iterator)
        interrupted.advance(1)
    next(iterator)  # prefetched by a worker but never reached the loop: must not count
    state = interrupted.state_dict()
    assert state["consumed"] == 4 * 10
    resumed = ResumableDistributedSampler(90, 1, 2, seed=3, batch_size=5)
    resumed.set_epoch(0)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the loop's set_epoch for the current epoch keeps the resumed position
    assert _epoch_batches(resumed) == uninterrupted[4:]


def test_resume_at_another_world_size_repeats_and_skips_nothing():
    samplers = [ResumableDistributedSampler(120, r, 2, seed=9, batch_size=6) for r in range(2)]
    consumed = []
    for _ in range(3):  # 3 global batches of 12 at W = 2
        for sampler in samplers:
            consumed += next(sampler.iter_batches())[1].tolist()
            sampler.advance(1)
    state = samplers[0].state_dict()
    resumed = [ResumableDistributedSampler(120, r, 3, seed=9, batch_size=4) for r in range(3)]
    for sampler in resumed:
        sampler.load_state_dict(state)
    rest = [i for sampler in resumed for i in sum(_epoch_batches(sampler), [])]
    assert len(rest) == (120 - 36) // 12 * 12 == 84
    assert len(set(consumed + rest)) == len(consumed) + len(rest) == 120


def test_sampler_state_mismatch_is_refused():
    state = ResumableDistributedSampler(50, 0, 1, seed=1, batch_size=5).state_dict()
    with pytest.raises(ValueError, match="50 images, the dataset has 60"):
        ResumableDistributedSampler(60, 0, 1, seed=1, batch_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="data.seed"):
        ResumableDistributedSampler(50, 0, 1, seed=2, batch_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="runtime.batch_size"):
        ResumableDistributedSampler(10, 0, 4, seed=1, batch_size=4)


# -- loader ------------------------------------------------------------------------------------------

def _collect(loader, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if count is not None and len(out) == count:
            break
    return out


def test_loader_batches_match_the_dataset_and_workers_do_not_change_them(tiny_rec):
    rec, images, labels = tiny_rec
    augment = ("data.flip=true", "data.color_jitter=0.3", "data.blur_prob=0.5")
    inline = build_train_loader(_cfg(rec, *augment), rank=0, world_size=1, device="cpu")
    assert (inline.num_images, inline.num_classes, inline.steps_per_epoch, len(inline)) == (24, 4, 6, 6)
    batches = _collect(inline)
    assert len(batches) == 6 and inline.epoch == 1
    order = inline.sampler.permutation(0)[:24]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor(labels)[order])
    plain = build_train_loader(_cfg(rec, "data.flip=false"), rank=0, world_size=1, device="cpu")
    first_images, _ = _collect(plain, 1)[0]
    expected = np.stack([images[i] for i in plain.sampler.permutation(0)[:4]]).transpose(0, 3, 1, 2)
    assert first_images.dtype == torch.uint8 and np.array_equal(first_images.numpy(), expected)
    workers = build_train_loader(_cfg(rec, *augment, "data.num_workers=2"), 0, 1, "cpu")
    try:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(_collect(workers), batches))
        assert workers.last_wait_seconds >= 0 and workers.total_wait_seconds > 0
    finally:
        workers.close()


def test_loader_resumes_mid_epoch_exactly(tiny_rec):
    rec, _, _ = tiny_rec
    cfg = _cfg(rec, "data.flip=true", "data.low_res_prob=0.5")
    uninterrupted = _collect(build_train_loader(cfg, 0, 1, "cpu"))
    first = build_train_loader(cfg, 0, 1, "cpu")
    head = _collect(first, 2)
    state = first.state_dict()
    second = build_train_loader(cfg, 0, 1, "cpu")
    second.load_state_dict(state)
    second.set_epoch(0)
    tail = _collect(second)
    assert len(head) + len(tail) == len(uninterrupted)
    for (a_img, a_lab), (b_img, b_lab) in zip(head + tail, uninterrupted):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)


def test_two_rank_loaders_make_the_single_process_batch(tiny_rec):
    rec, _, _ = tiny_rec
    single = _collect(build_train_loader(_cfg(rec, "runtime.batch_size=6"), 0, 1, "cpu"))
    ranks = [_collect(build_train_loader(_cfg(rec, "runtime.batch_size=3"), r, 2, "cpu")) for r in range(2)]
    for step, (images, labels) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), images)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), labels)


def test_loader_validation_errors_name_key_and_file(tiny_rec):
    rec, _, _ = tiny_rec
    with pytest.raises(ValueError, match=rf"data\.num_classes = 10 but {rec}.* has 4 classes"):
        build_train_loader(_cfg(rec, "data.num_classes=10"), 0, 1, "cpu")
    with pytest.raises(ValueError, match="runtime.batch_size"):
        build_train_loader(_cfg(rec, "runtime.batch_size=16"), 0, 2, "cpu")
    with pytest.raises(ValueError, match="data.rec is empty"):
        build_train_loader(load_config(None), 0, 1, "cpu")
    assert build_train_loader(_cfg(rec, "data.num_classes=4"), 0, 1, "cpu").num_classes == 4


def test_synthetic_mode_is_fixed_and_resumable():
    cfg = load_config("cpu_synthetic", ["data.synthetic_num_images=256", "runtime.batch_size=16"])
    loader = build_train_loader(cfg, 0, 1, "cpu")
    assert (loader.num_images, loader.num_classes, loader.steps_per_epoch) == (256, 64, 16)
    batches = _collect(loader)
    assert len(batches) == 16
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 112, 112) and labels.dtype == torch.int64
    order = torch.from_numpy(loader.sampler.permutation(0))
    assert torch.equal(torch.cat([b[1] for b in batches]), order % 64)
    again = build_train_loader(cfg, 0, 1, "cpu")
    again.load_state_dict({**loader.state_dict(), "epoch": 0, "consumed": 5 * 16})
    resumed = _collect(again, 1)[0]
    assert torch.equal(resumed[0], batches[5][0]) and torch.equal(resumed[1], batches[5][1])


_FORK_SCRIPT = """
import sys, cv2, numpy as np
import arcface.data.loader
from arcface.config import load_config
from arcface.data import build_train_loader
_init = arcface.data.loader._worker_init
def worker_init(worker_id):  # worker code that configures OpenCV: hangs if the parent's pool was inherited
    cv2.setNumThreads(1)
    _init(worker_id)
arcface.data.loader._worker_init = worker_init
cv2.setNumThreads(2)
cv2.GaussianBlur(np.zeros((2000, 2000, 3), np.uint8), (0, 0), 3.0)  # the parent's OpenCV pool is running
loader = build_train_loader(load_config(None, [f"data.rec={sys.argv[1]}", "data.num_workers=2",
                                              "runtime.batch_size=4", "data.blur_prob=1.0"]), 0, 1, "cpu")
print(sum(images.shape[0] for images, _ in loader))
loader.close()
"""


def test_workers_do_not_deadlock_after_the_parent_used_threaded_opencv(tiny_rec):
    """Regression: forked workers used to hang in their first OpenCV call (inherited thread-pool locks)."""
    import subprocess
    import sys

    rec, _, _ = tiny_rec
    root = ROOT
    result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, str(rec)], cwd=root, capture_output=True,
                            text=True, timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "24"
