"""IJB: a synthetic release in the standard layout, evaluated end to end; pooling vs a loop; caching."""

from __future__ import annotations

import csv
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
    for t, row in zip(ids, pooled):
        np.testing.assert_allclose(row, reference[t], rtol=1e-5, atol=1e-6)
    pairs = np.array([[ids[0], ids[1]], [ids[2], ids[2]]])
    np.testing.assert_allclose(ijb.score_pairs(ids, pooled, pairs, chunk_size=1),
                               [reference[ids[0]] @ reference[ids[1]], 1.0], rtol=1e-5)


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
