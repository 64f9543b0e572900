"""Full training step throughput vs the backbone's bare forward+backward, and the data pipeline's share.

    python bench/train_step.py            # mobilefacenet, batch 32, 20k classes (~2 min on 2 idle cores)
    python bench/train_step.py --quick    # batch 16, 2k classes (< 60 s)
    python bench/train_step.py --backbone r50 --batch-size 16 --classes 100000     # other sizes

Rows, all in one process on the same machine and in the same run:

* ``bare forward+backward`` (the reference): a copy of the backbone on a fixed normalised batch, ``sum``
  of the embeddings as the loss, backward, gradients dropped; no optimiser, no classifier, no data. It
  runs once after every update of the loop (interleaved), so both rates see the same machine load;
* ``train step, synthetic data``: :func:`arcface.train.train` on in-memory uint8 images (normalisation
  on the device, autocast setting, PartialFC forward/backward, both optimisers, clipping, the per-update
  loss check); the rate is measured between updates (after warm-up) with the loop's ``on_update`` hook;
* ``train step, RecordIO + 2 workers``: the same loop reading JPEGs from a ``.rec`` written here, decoded
  (and flipped) in 2 worker processes; its data-wait share is the fraction of the loop spent waiting.

Target: the synthetic train step within 10% of the bare rate (``overhead <= 10%``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arcface import preprocess  # noqa: E402
from arcface.config import load_config  # noqa: E402


class BareStep:
    """The reference: one forward+backward of a separate copy of the backbone on a fixed batch."""

    def __init__(self, backbone: str, embedding_size: int, batch_size: int) -> None:
        from backbones import create_backbone

        torch.manual_seed(0)
        self.model = create_backbone(backbone, embedding_size=embedding_size).train()
        images = torch.randint(0, 256, (batch_size, 3, 112, 112), dtype=torch.uint8)
        self.inputs = preprocess.normalize(images)
        self.durations: list[float] = []

    def __call__(self) -> None:
        started = time.perf_counter()
        self.model(self.inputs).sum().backward()
        self.model.zero_grad(set_to_none=True)
        self.durations.append(time.perf_counter() - started)


def write_rec(prefix: Path, num_images: int, num_classes: int) -> Path:
    """A small InsightFace-layout .rec of random-texture JPEGs (quality 95, like packed face crops)."""
    from recordio_tools.writer import FaceDatasetWriter

    rng = np.random.default_rng(0)
    writer = FaceDatasetWriter(prefix, layout="insightface", num_classes=num_classes)
    per_class = num_images // num_classes
    for label in range(num_classes):
        for i in range(per_class):
            # Smooth random texture (upsampled noise): compresses like a photo, unlike pure noise.
            small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            image = cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            writer.add(label, encoded.tobytes(), source_index=label * per_class + i)
    writer.close()
    return prefix.with_suffix(".rec")


def measure(overrides: list[str], bare: BareStep, steps: int, warmup: int, out: Path
            ) -> tuple[float, float, float]:
    """Median samples/s of the real loop's updates and of the bare step, INTERLEAVED, and the loop's
    data-wait share.

    After every update the loop's ``on_update`` hook runs one bare step, so both see the same load
    at the same moments (this machine is shared: measuring them one after the other gave ratios that
    moved by 2x). Each update is timed from the end of the previous hook to its own hook call.
    """
    from arcface.train import train

    cfg = load_config(None, [*overrides, f"output.dir={out}", f"schedule.total_steps={steps}",
                             "schedule.warmup_steps=0", "runtime.log_every=1000000", "runtime.device=cpu",
                             "output.checkpoint_every=0", "output.tensorboard=false", "eval.every=0"])
    update_durations: list[float] = []
    resumed_at: list[float] = []
    bare.durations.clear()

    def hook(step: int, loss: float) -> None:
        now = time.perf_counter()
        if resumed_at:
            update_durations.append(now - resumed_at[-1])
        bare()
        resumed_at.append(time.perf_counter())

    with contextlib.redirect_stdout(io.StringIO()):  # the run's own log lines would bury the table
        summary = train(cfg, on_update=hook)
    batch = cfg.global_batch_size(1)
    train_rate = batch / float(np.median(update_durations[warmup:]))
    bare_rate = batch / float(np.median(bare.durations[warmup:]))
    loop_seconds = summary["loop_seconds"] - sum(bare.durations)
    return train_rate, bare_rate, summary["data_wait_seconds"] / loop_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None, help="classifier size of the synthetic run")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None, help="updates per measurement (incl. warm-up)")
    args = parser.parse_args(argv)
    batch = args.batch_size or (16 if args.quick else 32)
    classes = args.classes or (2000 if args.quick else 20000)
    steps = args.steps or (6 if args.quick else 10)
    warmup = 2
    torch.set_num_threads(max(1, torch.get_num_threads()))

    common = [f"backbone.name={args.backbone}", f"backbone.embedding_size={args.embedding_size}",
              f"runtime.batch_size={batch}", f"fc.sample_rate={args.sample_rate}", "optim.grad_clip=5"]
    bare = BareStep(args.backbone, args.embedding_size, batch)
    rows: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp_path = Path(tmp)
        synthetic_data = ["data.synthetic=true", f"data.num_classes={classes}",
                          f"data.synthetic_num_images={batch * steps * 2}", "data.num_workers=0"]
        rows.append((f"synthetic in-memory data, {classes} classes",
                     *measure([*common, *synthetic_data], bare, steps, warmup, tmp_path / "synthetic")))
        rec_classes = 500 if args.quick else 1000
        rec = write_rec(tmp_path / "train", rec_classes * 2, rec_classes)
        rows.append((f"RecordIO JPEGs + 2 workers, {rec_classes} classes",
                     *measure([*common, f"data.rec={rec}", "data.num_workers=2", "data.flip=true"], bare,
                              steps, warmup, tmp_path / "recordio")))

    print(f"\nbackbone {args.backbone} (D={args.embedding_size}), batch {batch}, Partial FC sample rate "
          f"{args.sample_rate}, medians of {steps - warmup - 1} updates after {warmup} warm-up, each "
          f"followed by one bare step, {torch.get_num_threads()} threads, CPU fp32\n")
    print("| full train step on | train samples/s | bare fwd+bwd samples/s | train / bare | overhead "
          "| data-wait share |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, train_rate, bare_rate, wait in rows:
        print(f"| {name} | {train_rate:.1f} | {bare_rate:.1f} | {train_rate / bare_rate:.3f} | "
              f"{100 * (bare_rate / train_rate - 1):+.1f}% | {100 * wait:.1f}% |")
    goal = 100 * (rows[0][2] / rows[0][1] - 1)
    print(f"\ngoal: synthetic train-step overhead <= 10% -> measured {goal:+.1f}% "
          f"({'met' if goal <= 10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
