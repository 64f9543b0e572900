"""eval.metrics against brute-force loops written here and hand-computed cases."""

from __future__ import annotations

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


def test_tar_at_far_readings_hand_case():
    fpr = np.array([0.0, 0.0, 0.1, 0.1, 0.5, 1.0])
    tpr = np.array([0.0, 0.4, 0.4, 0.8, 0.9, 1.0])
    # nearest: FAR 0.12 -> fpr 0.1 points, highest TPR there = 0.8; FAR 0.0 -> 0.4.
    np.testing.assert_allclose(metrics.tar_at_far(fpr, tpr, [0.12, 0.0, 0.4], "nearest"), [0.8, 0.4, 0.9])
    # interpolated on the upper envelope: (0,0.4),(0.1,0.8),(0.5,0.9),(1,1).
    np.testing.assert_allclose(metrics.tar_at_far(fpr, tpr, [0.05, 0.3], "interpolated"), [0.6, 0.85])
    with pytest.raises(ValueError, match="mode"):
        metrics.tar_at_far(fpr, tpr, [0.1], "bogus")


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
