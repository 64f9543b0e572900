"""Benchmark: RecordIO read + decode vs a decode-only loop, and ``pack`` throughput with 1 and 2 workers.

    python bench/recordio_read.py            # 4,000 records of 112x112 JPEG (a few minutes on 2 cores)
    python bench/recordio_read.py --quick    # 600 records (< 60 s)

The reference for reading is ``cv2.imdecode`` over the same JPEG bytes already held in memory: the
ratio "ours / decode-only" shows what reading through the memory-mapped reader costs (goal >= 0.9).
Pack speed is images/s from an image folder of the same JPEGs to a finished pack (decode + encode + write).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recordio_tools.dataset import open_dataset  # noqa: E402
from recordio_tools.pack import PackOptions, pack  # noqa: E402


def face_like(identity: int, index: int) -> np.ndarray:
    """A 112x112 BGR image with face-sized structure and texture, so JPEG sizes are realistic (~5 KB)."""
    rng = np.random.default_rng(identity * 100_003 + index)
    base = np.random.default_rng(identity).integers(40, 220, 3)
    image = np.empty((112, 112, 3), np.uint8)
    image[:] = base
    center = (56 + int(rng.integers(-4, 5)), 60 + int(rng.integers(-4, 5)))
    cv2.ellipse(image, center, (34, 44), 0, 0, 360, tuple(int(v) for v in (base + 30) % 256), -1)
    for eye_x in (38, 74):
        cv2.circle(image, (eye_x + int(rng.integers(-2, 3)), 52), 5, (30, 30, 30), -1)
    cv2.ellipse(image, (56, 92), (14, 4 + int(rng.integers(0, 4))), 0, 0, 180, (40, 40, 160), -1)
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def make_folder(root: Path, identities: int, per_identity: int) -> None:
    for identity in range(identities):
        folder = root / f"id_{identity:05d}"
        folder.mkdir(parents=True)
        for index in range(per_identity):
            cv2.imwrite(str(folder / f"{index:03d}.jpg"), face_like(identity, index),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])


def rate_of(function, count: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    parser.add_argument("--records", type=int, default=None, help="images (default 4000; quick 600)")
    parser.add_argument("--repeats", type=int, default=3, help="read timings: best of this many runs")
    args = parser.parse_args(argv)
    count = args.records or (600 if args.quick else 4000)
    per_identity = 20
    identities = max(1, count // per_identity)
    count = identities * per_identity
    cv2.setNumThreads(1)  # one decoding thread for both sides: a like-for-like per-core rate

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        make_folder(root / "src", identities, per_identity)
        pack_rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            pack(root / "src", root / f"out{workers}" / "train",
                 PackOptions(workers=workers, quality=95, progress=False))
            pack_rates[workers] = count / (time.perf_counter() - start)

        dataset = open_dataset(root / "out1" / "train")
        blobs = [bytes(dataset.read_image(index)) for index in range(len(dataset))]
        mean_kb = np.mean([len(blob) for blob in blobs]) / 1024

        def decode_only() -> None:
            for blob in blobs:
                cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)

        def read_and_decode() -> None:
            for index in range(len(dataset)):
                cv2.imdecode(np.frombuffer(dataset.read_image(index), np.uint8), cv2.IMREAD_COLOR)

        def read_only() -> None:
            for index in range(len(dataset)):
                dataset.read_image(index)

        # Interleave to share whatever else the machine is doing between both sides.
        decode_rates, ours_rates = [], []
        for _ in range(args.repeats):
            decode_rates.append(rate_of(decode_only, count, 1))
            ours_rates.append(rate_of(read_and_decode, count, 1))
        read_rate = rate_of(read_only, count, args.repeats)
        decode_rate, ours_rate = max(decode_rates), max(ours_rates)

    print(f"# RecordIO read / pack benchmark ({dt.date.today()}, {platform.machine()}, "
          f"{count} records of 112x112 JPEG q95, mean {mean_kb:.1f} KiB)")
    print()
    print("| measurement | records/s | ratio |")
    print("|---|---:|---:|")
    print(f"| decode only (cv2.imdecode over bytes in memory; reference) | {decode_rate:,.0f} | 1.00 |")
    ratio = ours_rate / decode_rate
    print(f"| ours: FaceRecordDataset.read_image + decode | {ours_rate:,.0f} | {ratio:.2f} |")
    print(f"| ours: read_image only (no decode) | {read_rate:,.0f} | {read_rate / decode_rate:.1f} |")
    print(f"| pack, 1 worker (folder of JPEGs -> finished pack) | {pack_rates[1]:,.0f} | 1.00 |")
    print(f"| pack, 2 workers | {pack_rates[2]:,.0f} | {pack_rates[2] / pack_rates[1]:.2f} |")
    print()
    goal = "met" if ours_rate >= 0.9 * decode_rate else "NOT met"
    print(f"reader goal (read+decode >= 0.9 x decode-only): {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
