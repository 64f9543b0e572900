"""Benchmark and learnability check of the synthetic face generator (``recordio_tools.synth``).

    python bench/synth.py                 # speed: 3,000 images; learnability: ~4 min of CPU training
    python bench/synth.py --quick         # speed: 600 images, learnability: 40 s of training (~2 min)
    python bench/synth.py --no-learn      # speed table only

Speed: images/min of rendering (array), rendering + JPEG (what ``generate_folder`` does per image), and
``generate_folder`` end to end with 1 and 2 workers, against a bare ``cv2.imencode`` loop over random
112x112 images (the cost floor of writing any JPEG dataset), as a ratio.

Learnability: a disjoint range of held-out identities, a pairs file written by ``write_pairs`` (half
same identity), and the standard 10-fold verification accuracy (eval.metrics) of
1. raw-pixel cosine similarity (the images as vectors; also with each image's mean removed), and
2. a small MobileFaceNet trained with ArcFace on other identities for a fixed CPU time budget.
The generator is useful only if (1) is clearly below (2). A PNG plots the held-out accuracy over training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recordio_tools import synth  # noqa: E402


def _rate(function, count: int, repeats: int = 2) -> float:
    """Images per minute, best of ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return 60.0 * count / best


def speed_table(count: int) -> list[tuple[str, float]]:
    identities = max(2, count // 20)
    per_identity = count // identities
    count = identities * per_identity
    rng = np.random.default_rng(0)
    randoms = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(64)]

    def reference() -> None:
        for i in range(count):
            cv2.imencode(".jpg", randoms[i % 64], [cv2.IMWRITE_JPEG_QUALITY, 95])

    def render() -> None:
        for identity in range(identities):
            for index in range(per_identity):
                synth.render_identity_image(identity, index, 0)

    def render_jpeg() -> None:
        for identity in range(identities):
            for index in range(per_identity):
                synth.render_identity_jpeg(identity, index, 0)

    rows = [("reference: cv2.imencode of random 112x112 (q95)", _rate(reference, count))]
    rows.append(("render_identity_image (array)", _rate(render, count)))
    rows.append(("render_identity_jpeg (array + JPEG)", _rate(render_jpeg, count)))
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            def folder(workers=workers, tmp=tmp) -> None:
                out = Path(tmp) / f"run{time.perf_counter_ns()}"
                synth.generate_folder(out, identities, per_identity, workers=workers, progress=False)
            rows.append((f"generate_folder, {workers} worker{'s' if workers > 1 else ''} (files on disk)",
                         _rate(folder, count, repeats=1)))
    return rows


# ------------------------------------------------------------------------------------------ learnability
def _load(pairs_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 112, 112, 3 RGB uint8) of the pairs, as two aligned arrays, and the issame labels.
    (``write_pairs`` writes paths relative to the pairs file's folder.)"""
    from arcface.preprocess import decode_rgb

    root = pairs_file.parent
    first, second, issame = [], [], []
    for line in pairs_file.read_text().splitlines():
        path_a, path_b, same = line.split()
        first.append(decode_rgb((root / path_a).read_bytes(), path_a))
        second.append(decode_rgb((root / path_b).read_bytes(), path_b))
        issame.append(same == "1")
    return np.stack(first), np.stack(second), np.array(issame)


def _raw_pixel_accuracy(first: np.ndarray, second: np.ndarray, issame: np.ndarray, center: bool) -> float:
    from eval.metrics import kfold_accuracy, l2_normalize, squared_l2_distance

    a = first.reshape(len(first), -1).astype(np.float64)
    b = second.reshape(len(second), -1).astype(np.float64)
    if center:
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
    # Squared L2 of unit vectors = 2 - 2 cos: the protocol's threshold grid covers it.
    distances = squared_l2_distance(l2_normalize(a), l2_normalize(b))
    return float(kfold_accuracy(distances, issame).accuracy.mean())


def learnability(train_ids: int, per_id: int, heldout_ids: int, pairs: int, train_seconds: float,
                 plot_path: Path | None, seed: int = 0, backbone: str = "small") -> dict:
    import torch
    import torch.nn.functional as F

    from arcface.head.margins import CombinedMargin
    from arcface.preprocess import decode_rgb, flip_horizontal, normalize, to_chw_uint8
    from backbones import create_backbone
    from eval.metrics import kfold_accuracy, l2_normalize, squared_l2_distance

    torch.manual_seed(seed)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        synth.generate_folder(tmp / "train", train_ids, per_id, seed=seed, workers=2, progress=False)
        synth.generate_folder(tmp / "heldout", heldout_ids, 10, seed=seed, first_identity=100_000, workers=2,
                              progress=False)
        synth.write_pairs(tmp / "pairs.txt", tmp / "heldout", range(100_000, 100_000 + heldout_ids), pairs,
                          seed=seed)
        first, second, issame = _load(tmp / "pairs.txt")
        result["raw_pixel_cosine"] = _raw_pixel_accuracy(first, second, issame, center=False)
        result["raw_pixel_centered_cosine"] = _raw_pixel_accuracy(first, second, issame, center=True)
        images, labels = [], []
        for label, folder in enumerate(sorted(p for p in (tmp / "train").iterdir() if p.is_dir())):
            for path in sorted(folder.iterdir()):
                images.append(to_chw_uint8(decode_rgb(path.read_bytes(), str(path))))
                labels.append(label)
        train_images, train_labels = torch.stack(images), torch.tensor(labels)
        result["data_seconds"] = time.perf_counter() - start

    model = create_backbone("mobilefacenet_s", embedding_size=128) if backbone == "mobilefacenet" \
        else SmallFaceNet(128)
    weight = torch.nn.Parameter(torch.randn(train_ids, 128) * 0.01)
    margin = CombinedMargin(scale=32.0, m2=0.5)
    optimizer = torch.optim.SGD([*model.parameters(), weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    pair_a = normalize(to_chw_uint8_batch(first))
    pair_b = normalize(to_chw_uint8_batch(second))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            embed = [model(x) + model(flip_horizontal(x)) for x in (pair_a, pair_b)]
        model.train()
        distances = squared_l2_distance(l2_normalize(embed[0].numpy()), l2_normalize(embed[1].numpy()))
        return float(kfold_accuracy(distances, issame).accuracy.mean())

    batch = 64
    generator = torch.Generator().manual_seed(seed)
    history = [(0.0, evaluate())]
    trained, step, eval_every = 0.0, 0, max(train_seconds / 6, 1.0)
    next_eval = eval_every
    while trained < train_seconds:
        tic = time.perf_counter()
        # Linear decay over the time budget: a fixed-time recipe (the step count depends on the CPU).
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * max(0.02, 1.0 - trained / train_seconds)
        index = torch.randint(0, len(train_labels), (batch,), generator=generator)
        inputs = normalize(train_images[index])
        flip = torch.rand(batch, generator=generator) < 0.5
        inputs[flip] = flip_horizontal(inputs[flip])
        embeddings = model(inputs)
        cos_theta = F.linear(F.normalize(embeddings), F.normalize(weight))
        loss = F.cross_entropy(margin(cos_theta, train_labels[index]), train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        trained += time.perf_counter() - tic
        if trained >= next_eval or trained >= train_seconds:
            history.append((trained, evaluate()))
            print(f"  trained {trained:6.1f} s, step {step}, loss {loss.item():.3f}, "
                  f"held-out accuracy {history[-1][1]:.4f}", flush=True)
            next_eval += eval_every
    result.update(steps=step, train_seconds=trained, trained_accuracy=history[-1][1],
                  untrained_accuracy=history[0][1], history=history)
    if plot_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([h[0] for h in history], [h[1] for h in history], "o-", label=f"{backbone} CNN + ArcFace")
        ax.axhline(result["raw_pixel_cosine"], color="gray", ls="--", label="raw-pixel cosine")
        ax.axhline(result["raw_pixel_centered_cosine"], color="gray", ls=":", label="raw-pixel, mean removed")
        ax.set(xlabel="CPU training seconds", ylabel="held-out verification accuracy (10-fold)",
               title=f"synthetic faces: {train_ids} train ids, {heldout_ids} held-out ids", ylim=(0.45, 1.0))
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
    return result


def SmallFaceNet(embedding_size: int = 128):
    """A 4-stage conv net on 56x56 (the 112 input average-pooled 2x): ~15 MMAC per image, so a few CPU
    minutes train it on a loaded 2-core machine where MobileFaceNet manages ~4 s per batch of 64."""
    import torch.nn as nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]

    return nn.Sequential(nn.AvgPool2d(2), *block(3, 16), *block(16, 32), *block(32, 64), *block(64, 128),
                         nn.Flatten(), nn.Dropout(0.1), nn.Linear(128 * 4 * 4, embedding_size),
                         nn.BatchNorm1d(embedding_size))


def to_chw_uint8_batch(images_nhwc: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--no-learn", action="store_true", help="skip the learnability check")
    parser.add_argument("--images", type=int, default=None, help="images for the speed table")
    parser.add_argument("--train-seconds", type=float, default=None, help="CPU training time budget")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("synth_learnability.png")),
                        help="learnability plot (PNG)")
    parser.add_argument("--backbone", choices=["small", "mobilefacenet"], default="small",
                        help="network of the learnability check (mobilefacenet: ~15 s/step on a busy CPU)")
    args = parser.parse_args(argv)
    count = args.images or (600 if args.quick else 3000)
    cv2.setNumThreads(1)
    print(f"# synthetic faces, {dt.date.today()}, {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs, OpenCV {cv2.__version__}")
    rows = speed_table(count)
    reference = rows[0][1]
    print(f"\n| {'what':<52} | images/min | vs reference |\n|{'-' * 54}|-----------:|-------------:|")
    for name, rate in rows:
        print(f"| {name:<52} | {rate:10,.0f} | {rate / reference:11.2f}x |")
    if args.no_learn:
        return 0
    import torch

    torch.set_num_threads(2)
    train_seconds = args.train_seconds or (40.0 if args.quick else 240.0)
    sizes = (100, 10, 50, 400) if args.quick else (300, 20, 100, 1000)
    print(f"\nlearnability: {sizes[0]} train identities x {sizes[1]} images, {sizes[2]} held-out identities, "
          f"{sizes[3]} pairs, {train_seconds:.0f} s CPU training")
    result = learnability(*sizes, train_seconds=train_seconds, plot_path=Path(args.plot),
                          backbone=args.backbone)
    print(f"\n| held-out verification (10-fold accuracy)          | accuracy |\n|{'-' * 51}|---------:|")
    for name, value in (("raw-pixel cosine", result["raw_pixel_cosine"]),
                        ("raw-pixel cosine, per-image mean removed", result["raw_pixel_centered_cosine"]),
                        (f"{args.backbone} CNN, 128-d, untrained", result["untrained_accuracy"]),
                        (f"{args.backbone} CNN, ArcFace, {result['train_seconds']:.0f} s / "
                         f"{result['steps']} steps", result["trained_accuracy"])):
        print(f"| {name:<49} | {value:8.4f} |")
    print(f"\nplot: {args.plot}")
    if not math.isfinite(result["trained_accuracy"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
