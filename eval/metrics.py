"""Face-recognition metrics in pure numpy: the verification-pack protocol, ROC, TAR@FAR, CMC, TPIR@FPIR.

Conventions used throughout:

* **distances** (verification packs): squared L2 between L2-normalised embeddings, in ``[0, 4]``; a pair
  is predicted "same" when ``distance < threshold``.
* **scores** (IJB, MegaFace, thresholds for deployment): cosine similarity; a pair is accepted when
  ``score >= threshold``. For unit vectors ``distance = 2 - 2 * score``.
* ``labels`` / ``issame`` are booleans: True for genuine (same identity) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACCURACY_THRESHOLDS", "VAL_THRESHOLDS", "DEFAULT_FARS", "l2_normalize", "squared_l2_distance",
    "kfold_splits", "KFoldResult", "kfold_accuracy", "ValAtFar", "val_at_far", "val_at_far_detail",
    "best_global_threshold", "roc_curve",
    "tar_at_far", "thresholds_at_far", "operating_points", "cmc_from_ranks", "ranks_from_similarity",
    "cmc", "tpir_at_fpir",
]

# The standard verification protocol's grids (FORMATS.md section 4).
ACCURACY_THRESHOLDS = np.arange(0.0, 4.0, 0.01)
VAL_THRESHOLDS = np.arange(0.0, 4.0, 0.001)
DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def l2_normalize(embeddings: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (float32 in, float32 out; zero rows stay zero)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, eps)


def squared_l2_distance(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Row-wise squared L2 distance of two ``[P, D]`` arrays (float64 for stable thresholds)."""
    diff = np.asarray(embeddings1, dtype=np.float64) - np.asarray(embeddings2, dtype=np.float64)
    return np.sum(diff * diff, axis=1)


def _as_bool_labels(labels: np.ndarray | Sequence[bool], n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{what}: expected {n} labels, got shape {labels.shape}")
    return labels.astype(bool)


def kfold_splits(n: int, n_folds: int = 10) -> list[np.ndarray]:
    """Ordered (unshuffled) fold index arrays: the first ``n % n_folds`` folds get one extra item.

    This is the split every published LFW/CFP/AgeDB number uses (scikit-learn's ``KFold`` without
    shuffling), so pair i always lands in the same fold.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n < n_folds:
        raise ValueError(f"cannot split {n} pairs into {n_folds} folds (need at least {n_folds} pairs)")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_folds)]


def _confusion_over_thresholds(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """tp, fp, tn, fn for every threshold at once (predict same when distance < threshold).

    Sorting once and using ``searchsorted`` costs O((n + t) log n) instead of the O(n * t) of a loop
    over thresholds, which matters for the 4,000-point VAL grid on 7,000 pairs.
    """
    genuine = np.sort(distances[issame])
    impostor = np.sort(distances[~issame])
    tp = np.searchsorted(genuine, thresholds, side="left")  # count of genuine with d < t
    fp = np.searchsorted(impostor, thresholds, side="left")
    fn = genuine.size - tp
    tn = impostor.size - fp
    return tp, fp, tn, fn


@dataclass
class KFoldResult:
    """Per-fold outcome of the accuracy protocol; ``tpr``/``fpr`` are averaged over the test folds."""

    accuracy: np.ndarray           # [n_folds] held-out accuracy
    best_thresholds: np.ndarray    # [n_folds] threshold chosen on the other folds
    tpr: np.ndarray                # [len(thresholds)] mean over test folds
    fpr: np.ndarray                # [len(thresholds)]
    thresholds: np.ndarray


def kfold_accuracy(distances: np.ndarray, issame: np.ndarray | Sequence[bool],
                   thresholds: np.ndarray = ACCURACY_THRESHOLDS, n_folds: int = 10) -> KFoldResult:
    """The standard accuracy protocol: per fold, the threshold maximising accuracy on the other folds
    (the smallest such threshold on ties), accuracy measured on the held-out fold."""
    distances = np.asarray(distances, dtype=np.float64)
    issame = _as_bool_labels(issame, distances.shape[0], "kfold_accuracy")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = kfold_splits(distances.shape[0], n_folds)
    accuracy = np.zeros(n_folds)
    best = np.zeros(n_folds)
    tprs = np.zeros((n_folds, thresholds.size))
    fprs = np.zeros((n_folds, thresholds.size))
    everything = np.ones(distances.shape[0], dtype=bool)
    for k, test_idx in enumerate(folds):
        train_mask = everything.copy()
        train_mask[test_idx] = False
        tp, fp, tn, fn = _confusion_over_thresholds(distances[train_mask], issame[train_mask], thresholds)
        train_acc = (tp + tn) / train_mask.sum()
        best_index = int(np.argmax(train_acc))  # first maximum = smallest threshold on ties
        tp, fp, tn, fn = _confusion_over_thresholds(distances[test_idx], issame[test_idx], thresholds)
        # A fold without genuine (or impostor) pairs has an undefined rate: 0 by convention.
        tprs[k] = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        fprs[k] = np.where(fp + tn > 0, fp / np.maximum(fp + tn, 1), 0.0)
        accuracy[k] = (tp[best_index] + tn[best_index]) / test_idx.size
        best[k] = thresholds[best_index]
    return KFoldResult(accuracy, best, tprs.mean(axis=0), fprs.mean(axis=0), thresholds)


def _threshold_for_far_on_train(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray,
                                far_target: float) -> float:
    """Interpolate the threshold whose training FAR equals ``far_target`` (0 when it is unreachable)."""
    _, fp, tn, _ = _confusion_over_thresholds(distances, issame, thresholds)
    n_impostor = fp + tn
    far = np.where(n_impostor > 0, fp / np.maximum(n_impostor, 1), 0.0)
    if far.max() < far_target:
        return 0.0
    # Interpolate between the two adjacent grid thresholds whose FARs bracket the target (FAR is
    # non-decreasing in the threshold); this is what the reference's linear interp1d does.
    upper = int(np.argmax(far >= far_target))
    if upper == 0 or far[upper] == far[upper - 1]:
        return float(thresholds[upper])
    weight = (far_target - far[upper - 1]) / (far[upper] - far[upper - 1])
    return float(thresholds[upper - 1] + weight * (thresholds[upper] - thresholds[upper - 1]))


@dataclass
class ValAtFar:
    """VAL at a FAR target, with what was actually reached.

    ``val``/``val_std``/``far`` are means (std) over the held-out folds. ``train_far[k]`` is the FAR of
    fold k's threshold on the other folds' pairs. ``reachable`` says whether every fold's threshold
    reaches the target there: ``train_far[k] <= 2 * far_target + 1 / n_k`` for ``n_k`` training impostor
    pairs (a factor 2 for the 0.001 threshold grid, one pair for the ``1/n`` step of a measured FAR). It
    is False when the scores leave no threshold near the target, e.g. when many impostor pairs share one
    distance (a collapsed model: the FAR jumps from 0 to 1); ``val`` is then measured at the FAR ``far``,
    not at the target.
    """

    val: float
    val_std: float
    far: float
    far_target: float
    train_far: np.ndarray
    reachable: bool


def val_at_far_detail(distances: np.ndarray, issame: np.ndarray | Sequence[bool], far_target: float = 1e-3,
                      thresholds: np.ndarray = VAL_THRESHOLDS, n_folds: int = 10) -> ValAtFar:
    """VAL (true-accept rate) at a FAR, per fold with the threshold interpolated on the other folds."""
    distances = np.asarray(distances, dtype=np.float64)
    issame = _as_bool_labels(issame, distances.shape[0], "val_at_far")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = kfold_splits(distances.shape[0], n_folds)
    vals = np.zeros(n_folds)
    fars = np.zeros(n_folds)
    train_fars = np.zeros(n_folds)
    reachable = True
    everything = np.ones(distances.shape[0], dtype=bool)
    for k, test_idx in enumerate(folds):
        train_mask = everything.copy()
        train_mask[test_idx] = False
        threshold = _threshold_for_far_on_train(distances[train_mask], issame[train_mask], thresholds,
                                                far_target)
        train_impostor = distances[train_mask & ~issame]
        if train_impostor.size:
            train_fars[k] = (train_impostor < threshold).mean()
            reachable &= bool(train_fars[k] <= 2 * far_target + 1.0 / train_impostor.size + 1e-12)
        predict_same = distances[test_idx] < threshold
        genuine = issame[test_idx]
        vals[k] = (predict_same & genuine).sum() / max(genuine.sum(), 1)
        fars[k] = (predict_same & ~genuine).sum() / max((~genuine).sum(), 1)
    return ValAtFar(float(vals.mean()), float(vals.std()), float(fars.mean()), float(far_target), train_fars,
                    reachable)


def val_at_far(distances: np.ndarray, issame: np.ndarray | Sequence[bool], far_target: float = 1e-3,
               thresholds: np.ndarray = VAL_THRESHOLDS, n_folds: int = 10
               ) -> tuple[float, float, float]:
    """VAL (true-accept rate) at a FAR, per fold with the threshold interpolated on the other folds.

    Returns ``(val_mean, val_std, far_mean)`` over the held-out folds; :func:`val_at_far_detail` also
    says whether the target was reachable.
    """
    result = val_at_far_detail(distances, issame, far_target, thresholds, n_folds)
    return result.val, result.val_std, result.far


def best_global_threshold(distances: np.ndarray, issame: np.ndarray | Sequence[bool],
                          thresholds: np.ndarray = ACCURACY_THRESHOLDS) -> tuple[float, float]:
    """The squared-L2 threshold with the best accuracy over all pairs: ``(threshold, accuracy)``."""
    distances = np.asarray(distances, dtype=np.float64)
    issame = _as_bool_labels(issame, distances.shape[0], "best_global_threshold")
    tp, _, tn, _ = _confusion_over_thresholds(distances, issame, np.asarray(thresholds, dtype=np.float64))
    accuracy = (tp + tn) / distances.shape[0]
    index = int(np.argmax(accuracy))
    return float(thresholds[index]), float(accuracy[index])


def roc_curve(scores: np.ndarray, labels: np.ndarray | Sequence[bool], drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC of similarity ``scores`` (accept when ``score >= threshold``): ``(fpr, tpr, thresholds)``.

    One point per distinct score (tied scores move together), starting at ``(0, 0)`` with threshold
    ``+inf``. ``drop_intermediate`` removes every point whose step from the previous point equals its
    step to the next (the inside of a straight run of equal steps), the same points scikit-learn's
    ``roc_curve`` drops, so the "nearest point" TAR@FAR reading matches published tables. The dropped
    points lie on the segment between their kept neighbours: the curve as a line is unchanged.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = _as_bool_labels(labels, scores.shape[0], "roc_curve")
    n_genuine = int(labels.sum())
    n_impostor = labels.size - n_genuine
    if n_genuine == 0 or n_impostor == 0:
        raise ValueError(f"roc_curve needs genuine and impostor pairs (got {n_genuine} genuine, "
                         f"{n_impostor} impostor)")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    last_of_value = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels, dtype=np.int64)[last_of_value]
    fps = 1 + last_of_value - tps
    thresholds = sorted_scores[last_of_value]
    if drop_intermediate and tps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / n_impostor, tps / n_genuine, thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = DEFAULT_FARS,
               mode: str = "nearest") -> np.ndarray:
    """Read TAR at the given FARs off a ROC from :func:`roc_curve` (``fpr`` and ``tpr`` non-decreasing).

    * ``"nearest"``: the TPR of the ROC point whose FPR is closest to the target; among equally close
      points, the one with the highest TPR. This is the reading of InsightFace's IJB script and of most
      published IJB tables. It only sees the points it is given, so it depends on ``drop_intermediate``:
      the published numbers use the scikit-learn-style curve with collinear points dropped (the default
      of :func:`roc_curve`).
    * ``"interpolated"``: the complete ROC read at exactly the target FAR. Between two consecutive ROC
      points TAR follows the straight segment joining them: flat across impostor-only scores, vertical
      across genuine-only scores, diagonal only across scores shared by genuine and impostor pairs;
      where several points share the target FAR, the highest TAR. This equals the best TAR of a single
      threshold whose FAR does not exceed the target when the pairs tied at the threshold are accepted
      at random (in the proportion that brings FAR up to the target). It never lies above the ROC, and
      since the points :func:`roc_curve` drops lie on the segments between the points it keeps, it does
      not depend on ``drop_intermediate``.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    fars = np.asarray(fars, dtype=np.float64).ravel()
    if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size == 0:
        raise ValueError(f"fpr and tpr must be equal-length 1-d arrays, got {fpr.shape} and {tpr.shape}")
    if not (np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr))):
        raise ValueError("fpr and tpr must be finite")
    if np.any(np.diff(fpr) < 0) or np.any(np.diff(tpr) < 0):
        raise ValueError("fpr and tpr must both be non-decreasing (a ROC in the order roc_curve returns it)")
    if not np.all((fars >= 0.0) & (fars <= 1.0)):
        raise ValueError(f"FAR targets must be in [0, 1], got {fars.tolist()}")
    if mode == "nearest":
        out = np.empty(fars.size)
        for i, far in enumerate(fars):
            gap = np.abs(fpr - far)
            candidates = np.nonzero(gap == gap.min())[0]
            out[i] = tpr[candidates].max()
        return out
    if mode == "interpolated":
        if fars.size and fars.min() < fpr[0]:
            raise ValueError(f"the ROC starts at FPR {fpr[0]}, above the FAR target {fars.min()}: "
                             "interpolation needs a curve starting at FPR 0, as roc_curve returns it")
        # The last point at or before each target: on a vertical run at the target FAR this is its top.
        last = np.searchsorted(fpr, fars, side="right") - 1
        after = np.minimum(last + 1, fpr.size - 1)
        # Strictly inside a segment only when the next point lies further right (never on a vertical run).
        inside = fpr[after] > fars
        width = np.where(inside, fpr[after] - fpr[last], 1.0)
        weight = np.where(inside, (fars - fpr[last]) / width, 0.0)
        return tpr[last] + weight * (tpr[after] - tpr[last])
    raise ValueError(f"mode must be 'nearest' or 'interpolated', got {mode!r}")


def _thresholds_for_rates(impostor_scores: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Most permissive thresholds (accept when ``score >= t``) accepting at most ``floor(rate * n)``
    of the ``n`` impostor scores: each sits just above the first impostor score that must be rejected."""
    impostor = np.sort(np.asarray(impostor_scores, dtype=np.float64).ravel())[::-1]
    if impostor.size == 0:
        raise ValueError("a false-accept threshold needs impostor scores")
    out = np.empty(len(rates))
    for i, rate in enumerate(rates):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"FAR/FPIR targets must be in [0, 1], got {rate}")
        allowed = int(np.floor(rate * impostor.size + 1e-9))
        out[i] = impostor[-1] if allowed >= impostor.size else np.nextafter(impostor[allowed], np.inf)
    return out


def thresholds_at_far(scores: np.ndarray, labels: np.ndarray | Sequence[bool],
                      fars: Sequence[float] = DEFAULT_FARS) -> np.ndarray:
    """Cosine thresholds (accept when ``score >= threshold``) whose FAR on these pairs is <= each target.

    For a target ``f`` over ``n`` impostor scores at most ``floor(f * n)`` impostors are accepted; the
    threshold is the most permissive one that keeps the measured FAR within the target.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = _as_bool_labels(labels, scores.shape[0], "thresholds_at_far")
    return _thresholds_for_rates(scores[~labels], fars)


def operating_points(scores: np.ndarray, labels: np.ndarray | Sequence[bool],
                     fars: Sequence[float] = DEFAULT_FARS) -> list[dict[str, float]]:
    """For each FAR target: the threshold from :func:`thresholds_at_far` and its measured FAR and TAR."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = _as_bool_labels(labels, scores.shape[0], "operating_points")
    thresholds = thresholds_at_far(scores, labels, fars)
    genuine, impostor = scores[labels], scores[~labels]
    return [{"far_target": float(far), "threshold": float(t),
             "far": float((impostor >= t).mean()),
             "tar": float((genuine >= t).mean()) if genuine.size else float("nan")}
            for far, t in zip(fars, thresholds)]


def cmc_from_ranks(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """CMC curve from 1-based ranks of the true match: ``cmc[r-1]`` = fraction with rank <= r."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("cmc_from_ranks: no searches")
    counts = np.bincount(np.clip(ranks, 1, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    return np.cumsum(counts) / ranks.size


def ranks_from_similarity(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: 1-based rank of its best mate, the mate's score (NaN without a mate) and the top score.

    The rank counts gallery entries of *other* identities scoring at least as high as the best mate
    (ties go against the probe, so a constant embedder cannot look good). Probes whose identity is
    not in the gallery get rank 0.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    probe_labels = np.asarray(probe_labels)
    gallery_labels = np.asarray(gallery_labels)
    if similarity.shape != (probe_labels.size, gallery_labels.size):
        raise ValueError(f"similarity shape {similarity.shape} does not match {probe_labels.size} probes x "
                         f"{gallery_labels.size} gallery entries")
    is_mate = probe_labels[:, None] == gallery_labels[None, :]
    has_mate = is_mate.any(axis=1)
    mate_score = np.where(is_mate, similarity, -np.inf).max(axis=1)
    non_mate = np.where(is_mate, -np.inf, similarity)
    ranks = 1 + (non_mate >= mate_score[:, None]).sum(axis=1)
    ranks = np.where(has_mate, ranks, 0)
    mate_score = np.where(has_mate, mate_score, np.nan)
    return ranks, mate_score, similarity.max(axis=1)


def cmc(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
        max_rank: int = 20) -> np.ndarray:
    """Closed-set CMC of a probe x gallery similarity matrix (every probe must have a mate)."""
    ranks, _, _ = ranks_from_similarity(similarity, probe_labels, gallery_labels)
    if (ranks == 0).any():
        missing = np.asarray(probe_labels)[ranks == 0][:5]
        raise ValueError(f"closed-set CMC: {(ranks == 0).sum()} probes have no mate in the gallery "
                         f"(identities {missing.tolist()}...)")
    return cmc_from_ranks(ranks, max_rank)


def tpir_at_fpir(ranks: np.ndarray, mate_scores: np.ndarray, top_scores: np.ndarray,
                 fpirs: Sequence[float] = (1e-2, 1e-1), rank: int = 1) -> np.ndarray:
    """Open-set identification: TPIR at each FPIR.

    ``ranks``/``mate_scores``/``top_scores`` come from :func:`ranks_from_similarity`; probes with rank 0
    are non-mated. The threshold for an FPIR is set on the non-mated probes' top scores (accept when
    ``score >= threshold``); a mated probe counts as identified when its mate is within ``rank`` and
    its mate score passes the threshold.
    """
    ranks = np.asarray(ranks)
    mated = ranks > 0
    if not mated.any() or mated.all():
        raise ValueError(f"TPIR@FPIR needs mated and non-mated probes (got {int(mated.sum())} mated, "
                         f"{int((~mated).sum())} non-mated)")
    thresholds = _thresholds_for_rates(np.asarray(top_scores, dtype=np.float64)[~mated], fpirs)
    mate_scores = np.asarray(mate_scores, dtype=np.float64)[mated]
    within = ranks[mated] <= rank
    return np.array([float((within & (mate_scores >= t)).mean()) for t in thresholds])
