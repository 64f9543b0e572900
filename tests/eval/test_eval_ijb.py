"""IJB: a synthetic release in the standard layout, evaluated end to end; pooling vs a loop; caching."""

from __future__ import annotations

import csv
import math
from decimal import Decimal, getcontext
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from eval import ijb, metrics

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
OFFSET = np.array([20.0, 9.0], dtype=np.float32)  # where the 112x112 face sits inside the loose crop
N_IDS = 6


class ColourEmbedder:
    """'Perfect' model: the identity is painted into the face centre; it maps identity -> fixed vector."""

    embedding_size = N_IDS

    def __init__(self, noise: float = 0.0):
        self.calls = 0
        self.rng = np.random.default_rng(0)
        self.noise = noise

    def embed_images(self, rgb):
        self.calls += rgb.shape[0]
        identity = np.rint(rgb[:, 56, 56, 0] / 40.0).astype(int)  # red channel = 40 * identity
        out = np.eye(N_IDS, dtype=np.float32)[identity] * 2.0
        return out + self.noise * self.rng.normal(size=out.shape).astype(np.float32)


def make_release(root: Path, with_1n: bool = True) -> dict:
    """3 templates per identity, 2 medias per template, 1-2 images per media, PNG loose crops."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    face_lines, lmk_lines, subject_of = [], [], {}
    image_number = 0
    for identity in range(N_IDS):
        for t in range(3):
            template = 100 + 3 * identity + t
            subject_of[template] = identity
            for media in range(2):
                for _ in range(1 + (image_number % 2)):
                    name = f"{image_number}.png"
                    crop = np.zeros((140, 150, 3), np.uint8)
                    top, left = int(OFFSET[1]), int(OFFSET[0])
                    crop[top:top + 112, left:left + 112] = 40 * identity
                    cv2.imwrite(str(root / "loose_crop" / name), crop)
                    landmarks = (TEMPLATE + OFFSET).ravel()
                    face_lines.append(f"{name} {template} {1000 * template + media}")
                    lmk_lines.append(" ".join([name, *[f"{v:.4f}" for v in landmarks], "0.9"]))
                    image_number += 1
    templates = sorted(subject_of)
    pair_lines = [f"{a} {b} {int(subject_of[a] == subject_of[b])}" for i, a in enumerate(templates)
                  for b in templates[i + 1:]]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(face_lines) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    if with_1n:
        def write_csv(name, rows):
            with open(root / "meta" / name, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"])
                writer.writerows(rows)
        write_csv("ijbc_1N_gallery_G1.csv", [[100 + 3 * i, i, "x.jpg"] for i in range(3)])
        write_csv("ijbc_1N_gallery_G2.csv", [[100 + 3 * i, i, "x.jpg"] for i in range(3, N_IDS)])
        write_csv("ijbc_1N_probe_mixed.csv", [[t, s, "y.jpg"] for t, s in subject_of.items() if t % 3 != 1])
    return subject_of


def test_perfect_model_end_to_end(tmp_path):
    make_release(tmp_path / "IJBC")
    result = ijb.evaluate_ijb(ColourEmbedder(), tmp_path / "IJBC", cache_dir=tmp_path / "cache",
                              chunk_size=7, batch_size=4, progress=False)
    assert result.name == "IJBC" and result.num_templates == 3 * N_IDS
    assert result.num_pairs == 18 * 17 // 2
    assert all(v == 1.0 for v in result.tar_nearest.values())
    assert all(v == 1.0 for v in result.tar_interpolated.values())
    # Genuine template pairs score 1, impostors 0 (orthogonal identity vectors).
    np.testing.assert_allclose(result.scores[result.labels], 1.0, atol=1e-6)
    np.testing.assert_allclose(result.scores[~result.labels], 0.0, atol=1e-6)
    for gallery in ("G1", "G2"):
        stats = result.identification[gallery]
        assert stats["rank1"] == 1.0 and stats["num_mated"] == 6 and stats["num_probes"] == 12
        assert stats["tpir@fpir=0.1"] == 1.0


def brute_pool(features, templates, medias, scores, norm_as_quality):
    out = {}
    for t in sorted(set(templates.tolist())):
        total = 0
        for m in sorted(set(medias[templates == t].tolist())):
            rows = np.nonzero((templates == t) & (medias == m))[0]
            feats = [features[r] if norm_as_quality else features[r] / np.linalg.norm(features[r])
                     for r in rows]
            total = total + np.mean([f * scores[r] for f, r in zip(feats, rows)], axis=0)
        out[t] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("norm_as_quality", [True, False])
def test_pool_templates_matches_loop(norm_as_quality):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 8)) * rng.uniform(0.5, 3, size=(40, 1))
    templates = rng.integers(0, 6, 40) * 7 + 11
    medias = rng.integers(0, 3, 40)
    scores = rng.uniform(0.5, 1.0, 40)
    ids, pooled = ijb.pool_templates(features, templates, medias, scores, norm_as_quality)
    reference = brute_pool(features, templates, medias, scores, norm_as_quality)
    assert ids.tolist() == sorted(reference)
    assert pooled.dtype == np.float64
    # float64 embeddings stay float64 end to end: agreement to float64 rounding, not float32's.
    for t, row in zip(ids, pooled):
        np.testing.assert_allclose(row, reference[t], rtol=0, atol=1e-14)
    pairs = np.array([[ids[0], ids[1]], [ids[2], ids[2]]])
    pair_scores = ijb.score_pairs(ids, pooled, pairs, chunk_size=1)
    assert pair_scores.dtype == np.float64
    np.testing.assert_allclose(pair_scores, [reference[ids[0]] @ reference[ids[1]], 1.0], rtol=0, atol=1e-14)


def test_scores_below_float32_resolution_stay_apart():
    # Template 2 is (1, 1); template 3 adds a third media of norm 2**-28 along the first axis, so its
    # cosine with template 1 (the first axis) is larger by about 2**-28 / 2**1.5 = 1.3e-9, less than
    # float32's spacing near 0.7 (6e-8): float32 pooling or scores would make the two pairs tie.
    features = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1], [2.0 ** -28, 0]], dtype=np.float32)
    templates = np.array([1, 2, 2, 3, 3, 3])
    medias = np.array([0, 0, 1, 0, 1, 2])
    ids, pooled = ijb.pool_templates(features, templates, medias)
    scores = ijb.score_pairs(ids, pooled, np.array([[1, 2], [1, 3]]))
    x = 1 + 2.0 ** -28
    expected_gap = x / math.sqrt(x * x + 1) - 1 / math.sqrt(2)  # about 1.317e-9
    assert scores[1] > scores[0]
    assert scores[1] - scores[0] == pytest.approx(expected_gap, rel=1e-5)  # rounding: ~4e-16 / 1.3e-9


def test_pooling_input_errors():
    features = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="3 image features but 2 template ids"):
        ijb.pool_templates(features, np.array([1, 1]), np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="3 image features but 1 detector scores"):
        ijb.pool_templates(features, np.array([1, 1, 2]), np.array([0, 0, 0]), np.array([0.9]))
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        ijb.pool_templates(np.ones(3), np.array([1, 1, 2]), np.array([0, 0, 0]))
    ids, pooled = ijb.pool_templates(features, np.array([1, 1, 2]), np.array([0, 0, 0]))
    with pytest.raises(ValueError, match=r"template\(s\) \[1, 7\] have no features"):
        ijb.score_pairs(ids, pooled, np.array([[1, 2], [1, 7]]))


def test_feature_cache_resumes_and_refuses_stale(tmp_path):
    make_release(tmp_path / "IJBC", with_1n=False)
    release = ijb.load_ijb(tmp_path / "IJBC")
    first = ColourEmbedder(noise=0.1)
    features = ijb.embed_ijb(first, release, tmp_path / "cache", chunk_size=10, model_id="m", progress=False)
    assert first.calls == release.num_images
    (tmp_path / "cache" / "chunk_000002.npy").unlink()  # as if the run died while writing chunk 2
    second = ColourEmbedder(noise=0.1)
    resumed = ijb.embed_ijb(second, release, tmp_path / "cache", chunk_size=10, model_id="m", progress=False)
    assert second.calls == 10
    np.testing.assert_array_equal(resumed[:20], features[:20])
    np.testing.assert_array_equal(resumed[30:], features[30:])
    with pytest.raises(ValueError, match="feature cache was made for"):
        ijb.embed_ijb(second, release, tmp_path / "cache", chunk_size=10, model_id="other", progress=False)


def test_bad_release_inputs_name_file_and_line(tmp_path):
    make_release(tmp_path / "r", with_1n=False)
    meta = tmp_path / "r" / "meta"
    lines = (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-2])  # drop a landmark value and the score
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt line 4: expected 12 fields"):
        ijb.load_ijb(tmp_path / "r")
    make_release(tmp_path / "s", with_1n=False)
    with open(tmp_path / "s" / "meta" / "ijbc_template_pair_label.txt", "a") as handle:
        handle.write("100 999 0\n")
    with pytest.raises(ValueError, match=r"template 999 has no images"):
        ijb.load_ijb(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no ijbc_face_tid_mid.txt"):
        ijb.load_ijb(tmp_path)
    make_release(tmp_path / "u", with_1n=False)
    (tmp_path / "u" / "loose_crop" / "5.png").write_bytes(b"not an image")
    release = ijb.load_ijb(tmp_path / "u")
    with pytest.raises(ValueError, match=r"5.png"):
        ijb.embed_ijb(ColourEmbedder(), release, progress=False)


def test_noisy_model_gives_roc_between_chance_and_perfect(tmp_path):
    make_release(tmp_path / "IJBC", with_1n=False)
    result = ijb.evaluate_ijb(ColourEmbedder(noise=3.0), tmp_path / "IJBC", progress=False)
    fpr, tpr, _ = metrics.roc_curve(result.scores, result.labels, drop_intermediate=False)
    auc = np.trapezoid(tpr, fpr)
    assert 0.5 < auc < 1.0


# ---------------------------------------------------------------------------------------------------
# A small release whose every score, ROC point, TAR@FAR and 1:N figure is worked out independently.

E = np.eye(8)
EPS = 2.0 ** -28  # below float32 resolution at 1.0 (2**-23), far above float64 rounding (2**-52)


def H(*signs):
    """A unit vector of +-1/2 entries in the first four dimensions."""
    return np.r_[0.5 * np.array(signs, dtype=np.float64), np.zeros(4)]


# template id -> (subject, medias); a media is a list of images (flip-summed feature, detector score).
# Image norms and detector scores are powers of two or 0.75, so every per-image step is exact in any
# precision. The templates other than 103, 104 and 113-116 point along one direction of the first four
# dimensions (an axis or a +-1/2 vector) whatever the pooling setting: their cosines are exact
# multiples of 0.25 and tie heavily, genuine with impostor. 104 is (1, 1, 0, ...); 103 is 104 plus a
# tiny third media: with the norm as quality their cosines with 101 differ by about 1.3e-9, one pair
# genuine and one impostor, a difference that float32 templates or scores round away. 113-116 mix
# directions in the last four dimensions (cosine 0 with the others), so their pooled features and
# cosines change with every pooling setting. Media ids repeat across templates, as in the real files.
LAYOUT = {
    101: (0, [[(2 * E[0], 1.0)], [(E[0], 0.5), (4 * E[0], 0.75)]]),
    102: (0, [[(2 * H(1, 1, 1, 1), 0.75)], [(H(1, 1, 1, 1), 1.0)]]),
    103: (0, [[(E[0], 1.0)], [(E[1], 1.0)], [(EPS * E[0], 1.0)]]),
    104: (1, [[(E[0], 1.0)], [(E[1], 1.0)]]),
    105: (1, [[(E[1], 0.5)], [(2 * E[1], 1.0), (E[1], 1.0)]]),
    106: (1, [[(4 * H(1, 1, -1, -1), 0.5)]]),
    107: (2, [[(E[2], 1.0), (2 * E[2], 0.5)]]),
    108: (2, [[(H(1, -1, 1, -1), 1.0)], [(2 * H(1, -1, 1, -1), 0.5)]]),
    109: (3, [[(E[0], 0.75)]]),
    110: (3, [[(2 * E[0], 1.0)], [(E[0], 0.5)]]),
    111: (4, [[(H(-1, 1, 1, 1), 1.0)]]),
    112: (4, [[(E[3], 0.5), (2 * E[3], 1.0)], [(0.5 * E[3], 0.75)]]),
    113: (2, [[(2 * E[4], 1.0), (E[5], 0.5)], [(4 * E[6], 0.75)],
              [(E[7], 1.0), (0.5 * E[7], 0.5), (2 * E[5], 0.75), (E[6], 1.0)]]),
    114: (2, [[(E[4], 0.75)], [(2 * E[5], 1.0), (E[7], 0.5)]]),
    115: (4, [[(E[5], 1.0)], [(E[7], 0.5), (2 * E[6], 1.0), (E[6], 0.5), (E[4], 0.75)]]),
    116: (4, [[(4 * E[4], 0.5), (E[6], 0.75)], [(E[7], 1.0)]]),
}
# 103 against 104, 102 and 106 would be within ~1e-17 of another score: left out of the pair list.
SKIPPED_PAIRS = {(103, 104), (102, 103), (103, 106)}
PAIRS = [(a, b) for i, a in enumerate(LAYOUT) for b in list(LAYOUT)[i + 1:] if (a, b) not in SKIPPED_PAIRS]
GALLERIES = {"G1": [101, 105, 114], "G2": [109, 116]}  # subjects 0, 1, 2 and 3, 4
PROBES = [102, 103, 104, 106, 107, 108, 110, 111, 112, 113, 115]
SETTINGS = [(True, True), (True, False), (False, True), (False, False)]  # (norm_as_quality, detector)


class IndexEmbedder:
    """Returns the designed feature of the image whose number is painted into the face."""

    def __init__(self, features):
        self.features = np.asarray(features, dtype=np.float32)
        self.embedding_size = self.features.shape[1]

    def embed_images(self, rgb):
        return self.features[rgb[:, 56, 56, 0].astype(int)]


def write_layout_release(root: Path) -> np.ndarray:
    """Write LAYOUT as an IJB-C release; return the image features in image order."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    face_lines, lmk_lines, features = [], [], []
    landmarks = " ".join(f"{v:.4f}" for v in (TEMPLATE + OFFSET).ravel())
    for template, (_, medias) in LAYOUT.items():
        for media_index, media in enumerate(medias):
            for feature, detector_score in media:
                number = len(features)
                crop = np.zeros((140, 150, 3), np.uint8)
                crop[int(OFFSET[1]):int(OFFSET[1]) + 112, int(OFFSET[0]):int(OFFSET[0]) + 112] = number
                cv2.imwrite(str(root / "loose_crop" / f"{number}.png"), crop)
                face_lines.append(f"{number}.png {template} {7 + media_index}")
                lmk_lines.append(f"{number}.png {landmarks} {detector_score}")
                features.append(feature)
    subject = {t: s for t, (s, _) in LAYOUT.items()}
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(face_lines) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {int(subject[a] == subject[b])}\n" for a, b in PAIRS))
    for name, templates in [("ijbc_1N_gallery_G1.csv", GALLERIES["G1"]), ("ijbc_1N_gallery_G2.csv",
                            GALLERIES["G2"]), ("ijbc_1N_probe_mixed.csv", PROBES)]:
        with open(root / "meta" / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"])
            writer.writerows([t, subject[t], f"{t}.jpg"] for t in templates)
    return np.array(features, dtype=np.float32)


def reference_templates(norm_as_quality, use_detector_score, number=float, sqrt=math.sqrt):
    """The pooling protocol as plain loops over LAYOUT, in the arithmetic of ``number``."""
    out = {}
    for template, (_, medias) in LAYOUT.items():
        total = [number(0)] * E.shape[0]
        for media in medias:
            media_sum = [number(0)] * E.shape[0]
            for feature, detector_score in media:
                f = [number(float(np.float32(x))) for x in feature]
                if not norm_as_quality:
                    norm = sqrt(sum(x * x for x in f))
                    f = [x / norm for x in f]
                if use_detector_score:
                    f = [x * number(detector_score) for x in f]
                media_sum = [m + x for m, x in zip(media_sum, f)]
            total = [t + m / len(media) for t, m in zip(total, media_sum)]
        norm = sqrt(sum(x * x for x in total))
        out[template] = [x / norm for x in total]
    return out


def dot(a, b):
    total = a[0] * b[0]
    for x, y in zip(a[1:], b[1:]):
        total += x * y
    return total


def reference_roc(scores, labels):
    """scikit-learn's roc_curve (drop_intermediate=True) as a loop: ``(fpr, tpr)``."""
    points = []
    for threshold in sorted(set(scores), reverse=True):
        points.append((sum(1 for s, g in zip(scores, labels) if s >= threshold and not g),
                       sum(1 for s, g in zip(scores, labels) if s >= threshold and g)))
    kept = [p for k, p in enumerate(points)
            if k in (0, len(points) - 1)
            or (p[0] - points[k - 1][0], p[1] - points[k - 1][1])
            != (points[k + 1][0] - p[0], points[k + 1][1] - p[1])]
    n_genuine = sum(labels)
    n_impostor = len(labels) - n_genuine
    return [0.0] + [fp / n_impostor for fp, _ in kept], [0.0] + [tp / n_genuine for _, tp in kept]


def reference_nearest(fpr, tpr, far):
    """InsightFace's reading: flip the curve, take the first point with the smallest |FPR - target|."""
    fpr, tpr = fpr[::-1], tpr[::-1]
    _, index = min(zip([abs(f - far) for f in fpr], range(len(fpr))))
    return tpr[index]


def reference_interpolated(scores, labels, far):
    """TAR of the most permissive threshold with FAR <= far, ties at the threshold accepted at random.

    Whole score levels are accepted while the FAR stays within the target (a FAR compared as the double
    k / n, the curve's own abscissa), then the fraction of the next level that brings FAR to the target.
    """
    genuine = [s for s, g in zip(scores, labels) if g]
    impostor = [s for s, g in zip(scores, labels) if not g]
    accepted_genuine, accepted_impostor = Fraction(0), 0
    for level in sorted(set(scores), reverse=True):
        g, i = genuine.count(level), impostor.count(level)
        if (accepted_impostor + i) / len(impostor) <= far:
            accepted_genuine, accepted_impostor = accepted_genuine + g, accepted_impostor + i
        else:
            accepted_genuine += g * max(Fraction(far) * len(impostor) - accepted_impostor, 0) / i
            break
    return float(accepted_genuine / len(genuine))


def reference_identification(templates, gallery, fpirs=(1e-2, 1e-1)):
    """Rank-1/5/10 over mated probes (ties count against the probe) and TPIR@FPIR as loops."""
    subject = {t: s for t, (s, _) in LAYOUT.items()}
    gallery_subjects = {subject[g] for g in gallery}
    ranks, mate_scores, non_mated_top = [], [], []
    for probe in PROBES:
        scores = {g: dot(templates[probe], templates[g]) for g in gallery}
        if subject[probe] in gallery_subjects:
            mate = max(s for g, s in scores.items() if subject[g] == subject[probe])
            ranks.append(1 + sum(1 for g, s in scores.items() if subject[g] != subject[probe] and s >= mate))
            mate_scores.append(mate)
        else:
            non_mated_top.append(max(scores.values()))
    out = {"num_probes": len(PROBES), "num_mated": len(ranks), "num_gallery": len(gallery)}
    out.update({f"rank{r}": sum(1 for k in ranks if k <= r) / len(ranks) for r in (1, 5, 10)})
    top = sorted(non_mated_top, reverse=True)
    for fpir in fpirs:
        allowed = math.floor(Fraction(fpir) * len(top))  # non-mated searches that may pass
        identified = 0
        for rank, mate in zip(ranks, mate_scores):
            # Above the highest non-mated top score that must be rejected (or, when all may pass, at
            # least the lowest one).
            passes = mate >= top[-1] if allowed >= len(top) else mate > top[allowed]
            identified += rank == 1 and passes
        out[f"tpir@fpir={fpir:g}"] = identified / len(ranks)
    return out


def assert_no_rounding_sensitive_scores(code_scores, norm_as_quality, use_detector_score, pairs):
    """The layout's own check: with the exact cosines (50-digit decimals), scores that are mathematically
    equal are bit-equal in the code's float64 output, and all others are more than 1e-10 apart, so no
    rounding of a float64 computation (summation order, fused multiply-add) can reorder or tie them."""
    getcontext().prec = 50
    exact = reference_templates(norm_as_quality, use_detector_score, Decimal, Decimal.sqrt)
    values = [dot(exact[a], exact[b]) for a, b in pairs]
    for i in range(len(values)):
        for j in range(i):
            gap = abs(values[i] - values[j])
            if gap < Decimal("1e-30"):
                assert code_scores[i] == code_scores[j], (pairs[i], pairs[j])
            else:
                assert gap > Decimal("1e-10"), (pairs[i], pairs[j], gap)


@pytest.mark.parametrize("norm_as_quality,use_detector_score", SETTINGS)
def test_layout_matches_independent_float64_reference(tmp_path, norm_as_quality, use_detector_score):
    features = write_layout_release(tmp_path / "IJBC")
    result = ijb.evaluate_ijb(IndexEmbedder(features), tmp_path / "IJBC", chunk_size=16, batch_size=8,
                              use_detector_score=use_detector_score, norm_as_quality=norm_as_quality,
                              progress=False)
    subject = {t: s for t, (s, _) in LAYOUT.items()}
    labels = [subject[a] == subject[b] for a, b in PAIRS]
    templates = reference_templates(norm_as_quality, use_detector_score)
    scores = [dot(templates[a], templates[b]) for a, b in PAIRS]

    assert result.scores.dtype == np.float64
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(result.scores, scores, rtol=0, atol=1e-13)
    # Every score compared, 1:1 and 1:N (the same cosines of the same templates), is safe from rounding.
    release = ijb.load_ijb(tmp_path / "IJBC")
    ids, pooled = ijb.pool_templates(features, release.templates, release.medias,
                                     release.detector_scores if use_detector_score else None, norm_as_quality)
    compared = PAIRS + [(p, g) for members in GALLERIES.values() for g in members for p in PROBES]
    assert_no_rounding_sensitive_scores(ijb.score_pairs(ids, pooled, np.array(compared)), norm_as_quality,
                                        use_detector_score, compared)
    assert len(set(scores)) < len(scores) // 4  # heavy exact ties

    fpr, tpr = reference_roc(scores, labels)
    np.testing.assert_array_equal(result.roc_fpr, fpr)
    np.testing.assert_array_equal(result.roc_tpr, tpr)
    for far in ijb.IJB_FARS:
        assert result.tar_nearest[f"{far:g}"] == reference_nearest(fpr, tpr, far)
        expected = reference_interpolated(scores, labels, far)
        assert result.tar_interpolated[f"{far:g}"] == pytest.approx(expected, abs=1e-12)
    # Every FAR: each ROC abscissa and every point halfway between two of them.
    n_impostor = len(labels) - sum(labels)
    fars = np.arange(2 * n_impostor + 1) / (2 * n_impostor)
    code_fpr, code_tpr, _ = metrics.roc_curve(result.scores, result.labels)
    nearest = metrics.tar_at_far(code_fpr, code_tpr, fars, "nearest")
    interpolated = metrics.tar_at_far(code_fpr, code_tpr, fars, "interpolated")
    for far, near, inter in zip(fars, nearest, interpolated):
        assert near == reference_nearest(fpr, tpr, far), far
        assert inter == pytest.approx(reference_interpolated(scores, labels, far), abs=1e-12), far

    for gallery, members in GALLERIES.items():
        expected = reference_identification(templates, members)
        got = result.identification[gallery]
        assert {k: got[k] for k in expected} == expected, gallery
