"""Training-data throughput: our loader (decode + augment + collate) vs a bare decode loop.

    python bench/data_pipeline.py           # 4096 JPEG images (quality 95, 112x112), 2 epochs each
    python bench/data_pipeline.py --quick   # 512 images

Reference: one process reading each record and decoding it with ``arcface.preprocess.decode_rgb``
(the unavoidable cost). Rows: the TrainLoader inline (``num_workers = 0``) with flip only and with every
augmentation, and with 2 worker processes. The ratio is images/s of the row over the reference.
Also times the per-epoch shuffle of the sampler at MS1MV2 and WebFace42M sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcface.config import load_config  # noqa: E402
from arcface.data import ResumableDistributedSampler, build_train_loader  # noqa: E402
from arcface.preprocess import decode_rgb  # noqa: E402
from recordio_tools.dataset import open_dataset  # noqa: E402
from recordio_tools.writer import FaceDatasetWriter  # noqa: E402


def make_rec(folder: Path, num_images: int, num_classes: int = 64) -> Path:
    rng = np.random.default_rng(0)
    writer = FaceDatasetWriter(folder / "train", layout="insightface", num_classes=num_classes)
    per_class = num_images // num_classes
    for label in range(num_classes):
        for _ in range(per_class):
            image = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 1.5)
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            writer.add(label, jpeg.tobytes())
    writer.close()
    return folder / "train.rec"


def reference_rate(rec: Path, epochs: int) -> float:
    records = open_dataset(rec)
    started = time.perf_counter()
    for _ in range(epochs):
        for index in range(len(records)):
            decode_rgb(records.read_image(index))
    return epochs * len(records) / (time.perf_counter() - started)


def loader_rate(rec: Path, epochs: int, overrides: list[str]) -> tuple[float, float]:
    cfg = load_config(None, [f"data.rec={rec}", "runtime.batch_size=64", *overrides])
    loader = build_train_loader(cfg, 0, 1, "cpu")
    try:
        for _ in loader:  # warm-up epoch: worker start-up is a one-off cost with persistent workers
            pass
        started, wait_before, images = time.perf_counter(), loader.total_wait_seconds, 0
        for _ in range(epochs):
            for batch, _ in loader:
                images += batch.shape[0]
        elapsed = time.perf_counter() - started
        return images / elapsed, loader.total_wait_seconds - wait_before
    finally:
        loader.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 images, MS1MV2-size shuffle only")
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args(argv)
    num_images = args.images or (512 if args.quick else 4096)
    epochs = 2
    all_augment = ["data.flip=true", "data.random_resized_crop=true", "data.color_jitter=0.2",
                   "data.grayscale_prob=0.2", "data.blur_prob=0.2", "data.low_res_prob=0.2"]
    with tempfile.TemporaryDirectory() as tmp:
        rec = make_rec(Path(tmp), num_images)
        reference = reference_rate(rec, epochs)
        rows = [
            ("bare decode loop (reference)", reference, None),
            ("TrainLoader, 0 workers, flip", *loader_rate(rec, epochs, ["data.num_workers=0"])),
            ("TrainLoader, 0 workers, all augmentations",
             *loader_rate(rec, epochs, ["data.num_workers=0", *all_augment])),
            ("TrainLoader, 2 workers, flip", *loader_rate(rec, epochs, ["data.num_workers=2"])),
            ("TrainLoader, 2 workers, all augmentations",
             *loader_rate(rec, epochs, ["data.num_workers=2", *all_augment])),
        ]
    print(f"data pipeline: {num_images} JPEG images 112x112, batch 64, {epochs} timed epochs, CPU\n")
    print("| pipeline | images/s | ratio vs reference | loop's data wait (s) |")
    print("|---|---:|---:|---:|")
    for name, rate, wait in rows:
        print(f"| {name} | {rate:,.0f} | {rate / reference:.2f} | {'' if wait is None else f'{wait:.2f}'} |")
    print("\n| epoch shuffle (sampler) | images | seconds |")
    print("|---|---:|---:|")
    sizes = [("MS1MV2", 5_822_653)] + ([] if args.quick else [("WebFace42M", 42_474_557)])
    for name, size in sizes:
        sampler = ResumableDistributedSampler(size, 0, 8, seed=0, batch_size=128)
        started = time.perf_counter()
        sampler.permutation(0)
        print(f"| {name} | {size:,} | {time.perf_counter() - started:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
