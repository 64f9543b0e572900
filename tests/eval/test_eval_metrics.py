"""eval.metrics against brute-force loops written here and hand-computed cases."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from eval import metrics


def brute_kfold(distances, issame, thresholds, n_folds=10):
    """Straight from the protocol text: loops over folds and thresholds, np.array_split folds."""
    folds = np.array_split(np.arange(len(distances)), n_folds)
    accs, best = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(distances)), test)
        train_acc = []
        for t in thresholds:
            pred = distances[train] < t
            train_acc.append(np.mean(pred == issame[train]))
        i = int(np.argmax(train_acc))
        best.append(thresholds[i])
        accs.append(np.mean((distances[test] < thresholds[i]) == issame[test]))
    return np.array(accs), np.array(best)


@pytest.mark.parametrize("n", [10, 37, 200])
def test_kfold_accuracy_matches_brute_force(n):
    rng = np.random.default_rng(n)
    issame = rng.random(n) < 0.5
    # Overlapping classes and values snapped to the threshold grid: ties with thresholds are exercised.
    distances = np.round(np.where(issame, rng.normal(1.0, 0.4, n), rng.normal(1.6, 0.4, n)).clip(0, 4), 2)
    result = metrics.kfold_accuracy(distances, issame)
    accs, best = brute_kfold(distances, issame, metrics.ACCURACY_THRESHOLDS)
    np.testing.assert_allclose(result.accuracy, accs)
    np.testing.assert_allclose(result.best_thresholds, best)


def test_kfold_degenerate_fold_and_perfect_separation():
    # 20 pairs, first 10 genuine (so folds 0-4 are all-genuine: TPR defined, FPR 0 by convention).
    issame = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    distances = np.r_[np.full(10, 0.5), np.full(10, 2.5)]
    result = metrics.kfold_accuracy(distances, issame)
    assert np.all(result.accuracy == 1.0)
    # Smallest threshold reaching 100% on training folds: first grid point above 0.5.
    assert np.allclose(result.best_thresholds, 0.51)
    # Folds 5-9 hold no genuine pair: their TPR counts as 0 (the reference convention), so the mean
    # TPR at the largest threshold is 0.5, and FPR at the largest threshold is 1 on folds 5-9 only.
    assert result.fpr[0] == 0 and result.tpr[-1] == 0.5 and result.fpr[-1] == 0.5


def test_kfold_splits_ordered_and_uneven():
    folds = metrics.kfold_splits(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))
    with pytest.raises(ValueError, match="at least 10"):
        metrics.kfold_splits(9, 10)


def test_val_at_far_hand_case():
    # 10 folds of 10 pairs: 5 genuine at distance 0.2, 5 impostors at 1.0, 2.0, 3.0, 3.5, 3.9.
    block_d = np.array([0.2] * 5 + [1.0, 2.0, 3.0, 3.5, 3.9])
    block_s = np.array([True] * 5 + [False] * 5)
    distances, issame = np.tile(block_d, 10), np.tile(block_s, 10)
    # Training FAR is 0 up to t = 1.000 and 9/45 = 0.2 from t = 1.001 (d < t accepts): the target 0.1
    # interpolates to t = 1.0005, which accepts the impostor at 1.0 -> VAL 1 and test FAR 1/5 per fold.
    val, val_std, far = metrics.val_at_far(distances, issame, far_target=0.1)
    assert val == 1.0 and val_std == 0.0 and far == pytest.approx(0.2)
    # A FAR target met exactly on the grid picks the first threshold reaching it.
    val, _, far = metrics.val_at_far(distances, issame, far_target=0.2)
    assert far == pytest.approx(0.2)
    # Target 0.01 lies between FAR 0 and 0.2 -> t = 1.0 + 0.001 * 0.05 also above 1.0.
    assert metrics.val_at_far(distances, issame, far_target=0.01)[2] == pytest.approx(0.2)
    # With impostors strictly between grid points the interpolated threshold rejects them.
    d2 = np.tile(np.array([0.2] * 5 + [1.0005, 2.0, 3.0, 3.5, 3.9]), 10)
    assert metrics.val_at_far(d2, issame, far_target=0.01)[2] == 0.0
    # Unreachable FAR (impostors beyond the last grid threshold 3.999): threshold 0, nothing accepted.
    val, _, far = metrics.val_at_far(np.tile([0.2, 3.9995], 10), np.tile([True, False], 10), far_target=0.9)
    assert val == 0.0 and far == 0.0


def brute_roc(scores, labels):
    thresholds = np.unique(scores)[::-1]
    gen, imp = scores[labels], scores[~labels]
    fpr = np.array([0.0] + [np.mean(imp >= t) for t in thresholds])
    tpr = np.array([0.0] + [np.mean(gen >= t) for t in thresholds])
    return fpr, tpr, np.r_[np.inf, thresholds]


def test_roc_curve_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(np.where(labels, rng.normal(0.6, 0.2, 300), rng.normal(0.1, 0.2, 300)), 1)  # ties
    fpr, tpr, thr = metrics.roc_curve(scores, labels, drop_intermediate=False)
    bfpr, btpr, bthr = brute_roc(scores, labels)
    np.testing.assert_allclose(fpr, bfpr)
    np.testing.assert_allclose(tpr, btpr)
    np.testing.assert_allclose(thr, bthr)
    # Dropping collinear points keeps a subset with the same endpoints.
    dfpr, dtpr, dthr = metrics.roc_curve(scores, labels)
    assert set(dthr.tolist()) <= set(thr.tolist()) and dfpr[-1] == 1 and dtpr[-1] == 1


def brute_roc_dropped(scores, labels):
    """scikit-learn's rule written out: walk the distinct scores from the highest, keep the first and
    last point and every point whose step from the previous point differs from its step to the next,
    then put (0, 0) in front."""
    levels = sorted(set(scores.tolist()), reverse=True)
    points = []
    for t in levels:
        points.append((int(np.sum(~labels & (scores >= t))), int(np.sum(labels & (scores >= t)))))
    kept = [p for k, p in enumerate(points)
            if k in (0, len(points) - 1)
            or (p[0] - points[k - 1][0], p[1] - points[k - 1][1])
            != (points[k + 1][0] - p[0], points[k + 1][1] - p[1])]
    n_impostor, n_genuine = int(np.sum(~labels)), int(np.sum(labels))
    return (np.array([0.0] + [fp / n_impostor for fp, _ in kept]),
            np.array([0.0] + [tp / n_genuine for _, tp in kept]))


def brute_tar_randomised_threshold(scores, labels, far):
    """TAR of the most permissive threshold whose FAR stays within ``far``, with the pairs tied at the
    threshold accepted at random: walk the distinct scores from the highest, accepting whole levels
    while their FAR (compared as the double k / n_impostor, the curve's own abscissa) stays within the
    target, then the fraction of the next level that reaches it, in exact rational arithmetic."""
    genuine, impostor = scores[labels].tolist(), scores[~labels].tolist()
    accepted_genuine, accepted_impostor = Fraction(0), 0
    for level in sorted(set(scores.tolist()), reverse=True):
        g, i = genuine.count(level), impostor.count(level)
        if (accepted_impostor + i) / len(impostor) <= far:
            accepted_genuine += g
            accepted_impostor += i
        else:
            accepted_genuine += g * max(Fraction(far) * len(impostor) - accepted_impostor, 0) / i
            break
    return float(accepted_genuine / len(genuine))


def test_tar_at_far_readings_hand_case():
    fpr = np.array([0.0, 0.0, 0.1, 0.1, 0.5, 1.0])
    tpr = np.array([0.0, 0.4, 0.4, 0.8, 0.9, 1.0])
    # nearest: FAR 0.12 -> fpr 0.1 points, highest TPR there = 0.8; FAR 0.0 -> 0.4.
    np.testing.assert_allclose(metrics.tar_at_far(fpr, tpr, [0.12, 0.0, 0.4], "nearest"), [0.8, 0.4, 0.9])
    # interpolated along the curve: flat at 0.4 until FPR 0.1, where the vertical step tops out at 0.8,
    # then the segment (0.1, 0.8) - (0.5, 0.9).
    np.testing.assert_allclose(metrics.tar_at_far(fpr, tpr, [0.05, 0.1, 0.3], "interpolated"),
                               [0.4, 0.8, 0.85])
    with pytest.raises(ValueError, match="mode"):
        metrics.tar_at_far(fpr, tpr, [0.1], "bogus")


def test_tar_at_far_minimal_staircase():
    # 1.0 genuine, 0.9 and 0.8 impostors, 0.7 genuine. By hand, thresholds 1.0, 0.9, 0.8, 0.7 give
    # (FPR, TPR) = (0, 1/2), (1/2, 1/2), (1, 1/2), (1, 1); (1/2, 1/2) is the middle of a flat run of
    # equal steps, so the scikit-learn curve drops it.
    scores = np.array([1.0, 0.9, 0.8, 0.7])
    labels = np.array([True, False, False, True])
    fpr, tpr, thresholds = metrics.roc_curve(scores, labels, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 0.5, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 1.0, 0.9, 0.8, 0.7])
    dfpr, dtpr, dthresholds = metrics.roc_curve(scores, labels)
    np.testing.assert_array_equal(dfpr, [0, 0, 1, 1])
    np.testing.assert_array_equal(dtpr, [0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(dthresholds, [np.inf, 1.0, 0.8, 0.7])
    # At FAR 1/2 the ROC is at TAR 1/2 (accept the 1.0 genuine and the 0.9 impostor), whichever curve
    # is read; a line from (0, 1/2) to (1, 1) would say 3/4.
    fars = [0.0, 0.25, 0.5, 0.75, 1.0]
    expected = [0.5, 0.5, 0.5, 0.5, 1.0]
    np.testing.assert_array_equal(metrics.tar_at_far(fpr, tpr, fars, "interpolated"), expected)
    np.testing.assert_array_equal(metrics.tar_at_far(dfpr, dtpr, fars, "interpolated"), expected)
    # The nearest reading is a property of the points kept: on the dropped curve every point is 1/2
    # from FAR 1/2 and the highest TAR among them is 1.
    assert metrics.tar_at_far(fpr, tpr, [0.5], "nearest")[0] == 0.5
    assert metrics.tar_at_far(dfpr, dtpr, [0.5], "nearest")[0] == 1.0


def test_tie_heavy_roc_and_readings_hand_computed():
    # 8 genuine and 8 impostor cosines, all multiples of 0.25. Per score level (genuine, impostor):
    # 1.0 (2, 0), 0.75 (0, 1), 0.5 (0, 1), 0.25 (0, 1), 0.0 (3, 0), -0.25 (1, 1), -0.5 (1, 1),
    # -0.75 (1, 1), -1.0 (0, 2): a vertical step, a flat run, a vertical step, a diagonal run of ties.
    genuine = [1.0, 1.0, 0.0, 0.0, 0.0, -0.25, -0.5, -0.75]
    impostor = [0.75, 0.5, 0.25, -0.25, -0.5, -0.75, -1.0, -1.0]
    scores = np.array(genuine + impostor)
    labels = np.r_[np.ones(8, bool), np.zeros(8, bool)]
    # Cumulative (impostors, genuines) accepted per level: (0,2) (1,2) (2,2) (3,2) (3,5) (4,6) (5,7)
    # (6,8) (8,8); in eighths:
    fpr, tpr, _ = metrics.roc_curve(scores, labels, drop_intermediate=False)
    np.testing.assert_array_equal(fpr * 8, [0, 0, 1, 2, 3, 3, 4, 5, 6, 8])
    np.testing.assert_array_equal(tpr * 8, [0, 2, 2, 2, 2, 5, 6, 7, 8, 8])
    # Equal steps before and after: (1,2), (2,2) inside the flat run, (4,6), (5,7) inside the diagonal.
    dfpr, dtpr, dthr = metrics.roc_curve(scores, labels)
    np.testing.assert_array_equal(dfpr * 8, [0, 0, 3, 3, 6, 8])
    np.testing.assert_array_equal(dtpr * 8, [0, 2, 2, 5, 8, 8])
    np.testing.assert_array_equal(dthr, [np.inf, 1.0, 0.25, 0.0, -0.75, -1.0])
    bfpr, btpr = brute_roc_dropped(scores, labels)
    np.testing.assert_array_equal(dfpr, bfpr)
    np.testing.assert_array_equal(dtpr, btpr)

    fars = np.array([0, 1, 2, 4, 5, 6, 7, 8, 9, 12, 14, 16]) / 16
    # Interpolated, by hand on the full curve: flat at 2/8 up to FPR 3/8, where the vertical step tops
    # out at 5/8; then the diagonal (3/8, 5/8) - (6/8, 1); then flat at 1.
    interpolated = np.array([4, 4, 4, 4, 4, 10, 11, 12, 13, 16, 16, 16]) / 16
    np.testing.assert_array_equal(metrics.tar_at_far(fpr, tpr, fars, "interpolated"), interpolated)
    np.testing.assert_array_equal(metrics.tar_at_far(dfpr, dtpr, fars, "interpolated"), interpolated)
    # Nearest, by hand on the dropped curve (FPRs 0, 0, 3/8, 3/8, 6/8, 1): FAR 2/16 is nearer 0;
    # 4/16 nearer 3/8 (highest TAR there 5/8); 9/16 is 3/16 from both 3/8 and 6/8 -> the higher TAR, 1;
    # 14/16 is 1/8 from both 6/8 and 1 -> 1.
    nearest = np.array([4, 4, 4, 10, 10, 10, 10, 10, 16, 16, 16, 16]) / 16
    np.testing.assert_array_equal(metrics.tar_at_far(dfpr, dtpr, fars, "nearest"), nearest)
    # A straight line between the tops of the steps would read 1/2 at FAR 1/4; the ROC says 1/4.
    assert metrics.tar_at_far(dfpr, dtpr, [0.25], "interpolated")[0] == 0.25


@pytest.mark.parametrize("n_pairs", [12, 16, 24, 40, 96])
def test_interpolated_reading_is_the_randomised_threshold_tar(n_pairs):
    rng = np.random.default_rng(n_pairs)
    labels = np.arange(n_pairs) % 3 == 0
    # Every score a multiple of 0.25 in [-1, 1]: 9 levels, so with few pairs some levels are genuine- or
    # impostor-only (vertical and flat steps) and with many pairs nearly every level is a tie of both.
    scores = np.where(labels, rng.integers(-2, 5, n_pairs), rng.integers(-4, 3, n_pairs)) / 4.0
    n_impostor = int((~labels).sum())
    fars = np.unique(np.r_[np.arange(4 * n_impostor + 1) / (4 * n_impostor), 1e-6, 1e-3, 0.1, 1 / 3])
    expected = [brute_tar_randomised_threshold(scores, labels, f) for f in fars]
    for drop in (True, False):
        fpr, tpr, _ = metrics.roc_curve(scores, labels, drop_intermediate=drop)
        np.testing.assert_allclose(metrics.tar_at_far(fpr, tpr, fars, "interpolated"), expected,
                                   rtol=0, atol=1e-12)
    # The scikit-learn point set itself, against the rule written out.
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    bfpr, btpr = brute_roc_dropped(scores, labels)
    np.testing.assert_array_equal(fpr, bfpr)
    np.testing.assert_array_equal(tpr, btpr)


def test_tar_at_far_rejects_bad_input():
    fpr, tpr = np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"FAR targets must be in \[0, 1\]"):
        metrics.tar_at_far(fpr, tpr, [1.5])
    with pytest.raises(ValueError, match=r"FAR targets must be in \[0, 1\]"):
        metrics.tar_at_far(fpr, tpr, [np.nan], "interpolated")
    with pytest.raises(ValueError, match="non-decreasing"):
        metrics.tar_at_far(fpr[::-1], tpr[::-1], [0.1], "interpolated")
    with pytest.raises(ValueError, match="equal-length"):
        metrics.tar_at_far(fpr, tpr[:2], [0.1])
    with pytest.raises(ValueError, match="starts at FPR 0.5"):
        metrics.tar_at_far(fpr[1:], tpr[1:], [0.1], "interpolated")


def test_thresholds_at_far_are_tightest_within_target():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(50, bool), np.zeros(1000, bool)]
    scores = np.r_[rng.normal(0.7, 0.1, 50), np.round(rng.normal(0.0, 0.2, 1000), 3)]  # impostor ties
    fars = [0.0, 1e-3, 1e-2, 0.1, 1.0]
    thresholds = metrics.thresholds_at_far(scores, labels, fars)
    impostor = scores[~labels]
    for far, t in zip(fars, thresholds):
        assert np.mean(impostor >= t) <= far + 1e-12
        # Any lower impostor-valued threshold would accept more than allowed (unless all are accepted).
        lower = impostor[impostor < t]
        if lower.size:
            assert np.mean(impostor >= lower.max()) > far
    points = metrics.operating_points(scores, labels, [1e-2])
    assert points[0]["far"] <= 1e-2 and 0 < points[0]["tar"] <= 1


def brute_ranks(similarity, probe_labels, gallery_labels):
    ranks = []
    for i in range(similarity.shape[0]):
        order = sorted(range(similarity.shape[1]), key=lambda j: (-similarity[i, j],
                                                                  gallery_labels[j] == probe_labels[i]))
        mates = [k for k, j in enumerate(order) if gallery_labels[j] == probe_labels[i]]
        ranks.append(mates[0] + 1 if mates else 0)
    return np.array(ranks)


def test_cmc_and_ranks_match_brute_force_pessimistic_ties():
    rng = np.random.default_rng(2)
    gallery = np.arange(30)
    probes = rng.integers(0, 35, 60)  # some probes (30..34) have no mate
    similarity = np.round(rng.random((60, 30)), 1)  # many ties
    ranks, mate, top = metrics.ranks_from_similarity(similarity, probes, gallery)
    np.testing.assert_array_equal(ranks, brute_ranks(similarity, probes, gallery))
    assert np.isnan(mate[probes >= 30]).all() and np.allclose(top, similarity.max(axis=1))
    mated = probes < 30
    curve = metrics.cmc(similarity[mated], probes[mated], gallery, max_rank=30)
    expected = [np.mean(ranks[mated] <= r) for r in range(1, 31)]
    np.testing.assert_allclose(curve, expected)
    assert curve[-1] == 1.0
    with pytest.raises(ValueError, match="no mate"):
        metrics.cmc(similarity, probes, gallery)


def test_tpir_at_fpir_hand_case():
    # 4 mated probes (ranks 1,1,2,1; mate scores .9,.5,.8,.7) and 10 non-mated (top scores .0 .. .9).
    ranks = np.r_[[1, 1, 2, 1], np.zeros(10, int)]
    mate = np.r_[[0.9, 0.5, 0.8, 0.7], np.full(10, np.nan)]
    top = np.r_[[0.9, 0.5, 0.85, 0.7], np.arange(10) / 10]
    # FPIR 0.1 -> one non-mated (0.9) may pass: threshold just above 0.8 -> only probe 0 (0.9, rank 1).
    # FPIR 0.3 -> threshold just above 0.6 -> probes 0 and 3 (probe 2 has rank 2).
    np.testing.assert_allclose(metrics.tpir_at_fpir(ranks, mate, top, [0.1, 0.3]), [0.25, 0.5])
    np.testing.assert_allclose(metrics.tpir_at_fpir(ranks, mate, top, [0.3], rank=2), [0.75])
