"""Verification packs (``.bin``: LFW, CFP-FP, CFP-FF, AgeDB-30, CALFW, CPLFW, VGG2-FP) and their protocol.

Protocol (FORMATS.md section 4): embed each image and its mirror and sum, L2-normalise, squared L2
distance per pair, 10 ordered folds, per fold the threshold (0..4 step 0.01) best on the other nine,
accuracy on the held-out fold; mean +- std. Also VAL at FAR 1e-3 with the FAR actually reached, the
best global threshold, the mean embedding norm (before normalisation) and the ROC. A model whose pair
distances are all (nearly) equal is flagged as collapsed: its numbers are chance, whatever they say.

Distributed evaluation: with ``world_size > 1`` every rank embeds a contiguous slice of the images
(no communication while embedding) and a single all-gather at the very end assembles the embeddings,
so no rank waits in a collective while the others compute; every rank then computes the same metrics.
All ranks must call :func:`evaluate_pack` for the same packs in the same order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval import metrics
from eval.embedder import Embedder, embed_encoded

__all__ = ["STANDARD_PAIR_COUNTS", "VAL_FAR_TARGET", "COLLAPSE_SPREAD", "VerificationPack",
           "VerificationResult", "load_pack", "evaluate_pack", "evaluate_embeddings", "gather_rows",
           "format_far"]

# Published pair counts; a pack with one of these names but another count is refused (it is not the
# pack whose numbers people compare against).
STANDARD_PAIR_COUNTS = {"lfw": 6000, "cfp_fp": 7000, "cfp_ff": 7000, "agedb_30": 6000, "calfw": 6000,
                        "cplfw": 6000, "vgg2_fp": 5000}

VAL_FAR_TARGET = 1e-3
# A model is "collapsed" when all pair distances (squared L2 of unit vectors, in [0, 4]) lie within one
# step of the accuracy protocol's threshold grid: the protocol cannot separate any pairs, accuracy is
# chance (typically "50.00 +- 0.00%, threshold 0.00") and no other number means anything.
COLLAPSE_SPREAD = float(metrics.ACCURACY_THRESHOLDS[1] - metrics.ACCURACY_THRESHOLDS[0])


def format_far(far: float) -> str:
    """A false-accept rate for people, two significant digits: ``1e-3``, ``2.5e-4``, ``0.012``, ``0.5``,
    ``1``, ``0``."""
    if far == 0:
        return "0"
    if far >= 0.01:
        return f"{far:.2g}"
    mantissa, exponent = f"{far:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class VerificationPack:
    """A loaded pack; images stay encoded until :meth:`iter_encoded` hands them out."""

    name: str
    path: Path
    bins: list[bytes]
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    @property
    def num_images(self) -> int:
        return len(self.bins)

    def iter_encoded(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Encoded images ``start..stop`` in pack order (pair i = images 2i, 2i+1)."""
        yield from self.bins[start:stop]


def load_pack(path: str | os.PathLike[str], name: str | None = None, check_count: bool = True
              ) -> VerificationPack:
    """Read a pack with the restricted unpickler and validate it.

    ``name`` defaults to the file stem (``lfw.bin`` -> ``lfw``). With ``check_count`` a pack named like a
    standard benchmark must have its standard pair count. Raises ``ValueError`` subclasses naming the
    file for anything unexpected (unsafe pickle content, mismatched counts, too few pairs).
    """
    from recordio_tools.verification_bin import load_bin

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: verification pack not found")
    name = name or path.stem
    bins, issame = load_bin(path)
    if len(issame) < 10:
        raise ValueError(f"{path}: {len(issame)} pairs; the 10-fold protocol needs at least 10")
    expected = STANDARD_PAIR_COUNTS.get(name.lower())
    if check_count and expected is not None and len(issame) != expected:
        raise ValueError(f"{path}: pack named {name!r} has {len(issame)} pairs, the standard {name} pack has "
                         f"{expected} (rename it or pass check_count=False)")
    return VerificationPack(name=name, path=path, bins=bins, issame=np.asarray(issame, dtype=bool))


@dataclass
class VerificationResult:
    """Everything the protocol reports for one pack; ``to_dict`` drops the bulky arrays.

    ``val_at_far_1e3`` is the VAL of the protocol's per-fold thresholds for the target
    ``val_far_target``; ``far_at_val`` is the FAR those thresholds actually gave on the held-out folds,
    and ``val_far_reachable`` is False when no threshold reaches the target on the training folds (the
    VAL is then measured at ``far_at_val``, see :class:`eval.metrics.ValAtFar`). ``collapsed`` is True
    when the spread of the pair distances (``distance_spread``, max - min) is below ``COLLAPSE_SPREAD``:
    the model does not tell faces apart (such a result must never be taken as a best model).
    """

    name: str
    num_pairs: int
    accuracy_mean: float
    accuracy_std: float
    val_at_far_1e3: float
    val_at_far_1e3_std: float
    far_at_val: float
    best_threshold: float
    best_threshold_accuracy: float
    norm_mean: float
    fold_accuracy: list[float]
    fold_thresholds: list[float]
    seconds: float = 0.0
    val_far_target: float = VAL_FAR_TARGET
    val_far_reachable: bool = True
    collapsed: bool = False
    distance_spread: float | None = None
    roc_fpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    roc_tpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    distances: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    issame: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool), repr=False)

    def to_dict(self, with_arrays: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        if with_arrays:
            out.update(roc_fpr=self.roc_fpr.tolist(), roc_tpr=self.roc_tpr.tolist())
        return out

    def val_text(self) -> str:
        """``VAL 98.90% @ FAR 1.1e-3 (target 1e-3)``, or ``... (target 1e-3 not reachable)``."""
        note = "" if self.val_far_reachable else " not reachable"
        return (f"VAL {100 * self.val_at_far_1e3:.2f}% @ FAR {format_far(self.far_at_val)} "
                f"(target {format_far(self.val_far_target)}{note})")

    def collapse_warning(self) -> str:
        """The warning for a collapsed model ("" otherwise)."""
        if not self.collapsed:
            return ""
        spread = ("are equal" if not self.distance_spread
                  else f"lie within {self.distance_spread:.2g} of each other (< {COLLAPSE_SPREAD:g}, the "
                       "threshold step)")
        return (f"COLLAPSED MODEL: all {self.num_pairs} pair distances {spread}: the embeddings do not tell "
                "faces apart, so these numbers are chance")

    def summary(self) -> str:
        text = (f"{self.name}: accuracy {100 * self.accuracy_mean:.2f} +- {100 * self.accuracy_std:.2f}%, "
                f"{self.val_text()}, threshold {self.best_threshold:.2f}, norm {self.norm_mean:.2f}")
        return f"{text}; WARNING: {self.collapse_warning()}" if self.collapsed else text


def evaluate_embeddings(name: str, embeddings: np.ndarray, issame: np.ndarray, seconds: float = 0.0
                        ) -> VerificationResult:
    """The protocol on flip-summed, unnormalised embeddings ``[2P, D]`` in pack order."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.shape[0] != 2 * issame.size:
        raise ValueError(f"{name}: {embeddings.shape[0]} embeddings for {issame.size} pairs")
    if not np.isfinite(embeddings).all():
        bad = int(np.nonzero(~np.isfinite(embeddings).all(axis=1))[0][0])
        raise ValueError(f"{name}: embedding of image {bad} is not finite (NaN/Inf from the model)")
    norm_mean = float(np.linalg.norm(embeddings, axis=1).mean())
    normalised = metrics.l2_normalize(embeddings)
    distances = metrics.squared_l2_distance(normalised[0::2], normalised[1::2])
    kfold = metrics.kfold_accuracy(distances, issame)
    val = metrics.val_at_far_detail(distances, issame, VAL_FAR_TARGET)
    threshold, threshold_acc = metrics.best_global_threshold(distances, issame)
    spread = float(distances.max() - distances.min())
    return VerificationResult(
        name=name, num_pairs=int(issame.size), accuracy_mean=float(kfold.accuracy.mean()),
        accuracy_std=float(kfold.accuracy.std()), val_at_far_1e3=val.val, val_at_far_1e3_std=val.val_std,
        far_at_val=val.far, best_threshold=threshold, best_threshold_accuracy=threshold_acc,
        norm_mean=norm_mean, fold_accuracy=kfold.accuracy.tolist(),
        fold_thresholds=kfold.best_thresholds.tolist(), seconds=seconds, val_far_target=val.far_target,
        val_far_reachable=val.reachable, collapsed=spread < COLLAPSE_SPREAD, distance_spread=spread,
        roc_fpr=kfold.fpr, roc_tpr=kfold.tpr, distances=distances, issame=issame)


def _slice_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    # Uneven split like the class partition: the first n % W ranks take one extra image.
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows(rows: np.ndarray, world_size: int, device: torch.device | None = None) -> np.ndarray:
    """All-gather ``[n_r, D]`` float32 arrays of (possibly) different lengths; concatenated in rank order.

    One tensor all-gather (padded to the longest slice) plus a tiny one for the lengths; on NCCL the
    tensors travel through the current CUDA device, on gloo through the CPU.
    """
    import torch.distributed as dist

    if world_size == 1:
        return rows
    if not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                  else torch.device("cpu"))
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    length = torch.tensor([rows.shape[0], rows.shape[1] if rows.ndim == 2 else 0], device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    sizes = [int(t[0]) for t in lengths]
    width = max(int(t[1]) for t in lengths)
    padded = torch.zeros((max(sizes), width), dtype=torch.float32, device=device)
    if rows.shape[0]:
        padded[: rows.shape[0]] = torch.from_numpy(rows).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return np.concatenate([g[:n].cpu().numpy() for g, n in zip(gathered, sizes)])


def evaluate_pack(embedder: Embedder, pack: VerificationPack, batch_size: int = 64, rank: int = 0,
                  world_size: int = 1, progress: bool = False) -> VerificationResult:
    """Embed a pack (this rank's slice when ``world_size > 1``) and run the protocol.

    Decoded images are held one batch at a time. With several ranks, all ranks must call this and all
    return the same result (see the module docstring for why this never blocks a rank for long).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    started = time.perf_counter()
    start, stop = _slice_bounds(pack.num_images, rank, world_size)
    bar = None
    if progress:
        from recordio_tools.progress import progress_bar

        bar = progress_bar(total=stop - start, desc=f"embed {pack.name}", unit="img", disable=rank != 0)
    try:
        local = embed_encoded(embedder, pack.iter_encoded(start, stop), batch_size=batch_size,
                              sources=(f"{pack.path} image {i}" for i in range(start, stop)), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    embeddings = gather_rows(local, world_size)
    return evaluate_embeddings(pack.name, embeddings, pack.issame, seconds=time.perf_counter() - started)
