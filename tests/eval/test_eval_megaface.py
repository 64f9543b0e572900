"""MegaFace: devkit feature files (golden bytes), refined protocol, chunked search vs a dense brute force."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from eval import megaface, metrics


def test_feature_file_golden_bytes_and_round_trip(tmp_path):
    vector = np.array([1.0, -2.5, 0.25], dtype=np.float32)
    path = megaface.feature_path(tmp_path, "Aaron_Eckhart/Aaron_Eckhart_1.png", "_r100")
    assert path.name == "Aaron_Eckhart_1.png_r100.bin"
    megaface.write_feature(path, vector)
    # OpenCV Mat layout written by hand from the spec: rows=3, cols=1, elem_size=4, type=5 (CV_32F).
    assert path.read_bytes() == struct.pack("<4i", 3, 1, 4, 5) + struct.pack("<3f", 1.0, -2.5, 0.25)
    np.testing.assert_array_equal(megaface.read_feature(path), vector)


@pytest.mark.parametrize("content,message", [
    (b"\x01\x00", "shorter than the 16-byte"),
    (struct.pack("<4i", 3, 1, 4, 6) + b"\x00" * 12, "CV_32F"),
    (struct.pack("<4i", 3, 1, 4, 5) + b"\x00" * 8, "expected 28"),
])
def test_bad_feature_files_are_named(tmp_path, content, message):
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        megaface.read_feature(path)
    assert str(path) in str(info.value)


def brute_megaface(probes, identities, distractors, far):
    """Dense reference: every (probe, mate) search over the full similarity matrix, exact impostor list."""
    probes = metrics.l2_normalize(probes)
    distractors = metrics.l2_normalize(distractors)
    ids = np.asarray(identities)
    dense = probes @ distractors.T
    ranks, genuine_pairs = [], []
    for p in range(len(ids)):
        for g in range(len(ids)):
            if p != g and ids[p] == ids[g]:
                s = float(probes[p] @ probes[g])
                ranks.append(1 + int((dense[p] >= s).sum()))
                if p < g:
                    genuine_pairs.append(s)
    impostor = dense.ravel()
    scores = np.r_[genuine_pairs, impostor]
    labels = np.r_[np.ones(len(genuine_pairs), bool), np.zeros(impostor.size, bool)]
    threshold = metrics.thresholds_at_far(scores, labels, [far])[0]
    tar = float(np.mean(np.asarray(genuine_pairs) >= threshold))
    return np.array(ranks), tar


def test_chunked_search_equals_dense_brute_force_over_prefixes():
    rng = np.random.default_rng(0)
    identities = np.repeat([f"id{i}" for i in range(8)], 4)
    centres = rng.normal(size=(8, 16))
    probes = centres.repeat(4, axis=0) + 0.9 * rng.normal(size=(32, 16))
    distractors = metrics.l2_normalize(rng.normal(size=(700, 16)) + 0.3 * centres[rng.integers(0, 8, 700)])
    sizes = [10, 100, 700]
    results = megaface.evaluate_megaface(probes, identities, distractors, sizes=sizes, max_rank=5,
                                         fars=[1e-3], chunk_size=64)
    for result, size in zip(results, sizes):
        ranks, tar = brute_megaface(probes, identities, distractors[:size], 1e-3)
        assert result.num_distractors == size and result.num_searches == ranks.size
        np.testing.assert_allclose(result.cmc, metrics.cmc_from_ranks(ranks, 5))
        assert result.rank1 == pytest.approx(np.mean(ranks == 1))
        assert result.tar_at_far["0.001"] == pytest.approx(tar)
    assert results[0].rank1 >= results[-1].rank1  # more distractors never help


def test_search_keeps_exact_top_lists_with_ties_and_invalid_distractors():
    """The streamed top-k / impostor lists (dense warm-up, then sparse merges) equal a full sort."""
    rng = np.random.default_rng(3)
    # Few distinct values (one-decimal grid): many ties at every cut-off.
    probes = rng.integers(-3, 4, size=(40, 6)).astype(np.float32) / 10
    distractors = rng.integers(-3, 4, size=(3000, 6)).astype(np.float32) / 10
    valid = rng.random(3000) > 0.2
    sizes = [5, 1100, 3000]
    results = megaface.search_distractors(probes, distractors, sizes, top_k=7, impostor_keep=50,
                                          chunk_size=300, valid=valid)
    for result, size in zip(results, sizes):
        dense = (probes.astype(np.float64) @ distractors[:size][valid[:size]].T.astype(np.float64))
        expect_top = -np.sort(-dense, axis=1)[:, :7]
        if expect_top.shape[1] < 7:
            expect_top = np.pad(expect_top, ((0, 0), (0, 7 - expect_top.shape[1])), constant_values=-np.inf)
        np.testing.assert_allclose(result.top_scores, expect_top, atol=1e-6)
        np.testing.assert_allclose(result.impostor_top, -np.sort(-dense.ravel())[:50], atol=1e-6)


def test_refined_protocol_matches_devkit_extra_dimension(tmp_path):
    """Our refined evaluation == brute force on the devkit's augmented features under L2 distance."""
    rng = np.random.default_rng(1)
    identities = np.repeat(["a", "b", "c"], 3)
    probes = np.repeat(rng.normal(size=(3, 8)), 3, axis=0) + 0.5 * rng.normal(size=(9, 8))
    probes[1] = rng.normal(size=8) * 5  # a mislabelled probe ...
    probe_noisy = np.zeros(9, bool)
    probe_noisy[1] = True
    distractors = metrics.l2_normalize(rng.normal(size=(50, 8)))
    distractors[7] = metrics.l2_normalize(probes[:1])[0]  # ... and a distractor that is really "a"
    distractor_noisy = np.zeros(50, bool)
    distractor_noisy[7] = True
    ours = megaface.evaluate_megaface(probes, identities, distractors, probe_noisy=probe_noisy,
                                      distractor_noisy=distractor_noisy, max_rank=3)[0]

    names_p = [f"{i}/{k}.png" for i, k in zip(identities, range(9))]
    names_d = [f"d/{k}.jpg" for k in range(50)]
    megaface.write_devkit_features(tmp_path / "fs", names_p, probes, noisy=probe_noisy,
                                   identities=identities, role="probe")
    megaface.write_devkit_features(tmp_path / "mf", names_d, distractors, noisy=distractor_noisy)
    p_aug = megaface.read_feature_folder(tmp_path / "fs", names_p)
    d_aug = megaface.read_feature_folder(tmp_path / "mf", names_d)
    assert p_aug.shape == (9, 9) and d_aug[7, -1] == megaface.NOISE_VALUE and d_aug[0, -1] == 0
    # Devkit-style ranking by L2 distance on the augmented features.
    ranks = []
    for p in range(9):
        for g in range(9):
            if p != g and identities[p] == identities[g]:
                d_mate = np.sum((p_aug[p] - p_aug[g]) ** 2)
                ranks.append(1 + int((np.sum((d_aug - p_aug[p]) ** 2, axis=1) <= d_mate).sum()))
    np.testing.assert_allclose(ours.cmc, metrics.cmc_from_ranks(np.array(ranks), 3))
    # The noisy probe was replaced by the centre of a's clean images.
    centre = metrics.l2_normalize(metrics.l2_normalize(probes)[[0, 2]].mean(axis=0, keepdims=True))[0]
    np.testing.assert_allclose(p_aug[1, :8], centre, rtol=1e-5, atol=1e-6)


def test_perfect_features_rank1_is_one_and_fp16_storage():
    rng = np.random.default_rng(2)
    centres = metrics.l2_normalize(rng.normal(size=(5, 32)))
    identities = np.repeat(list("vwxyz"), 3)
    distractors = metrics.l2_normalize(rng.normal(size=(2000, 32))).astype(np.float16)
    result = megaface.evaluate_megaface(centres.repeat(3, axis=0), identities, distractors,
                                        fars=[1e-6, 1e-3])[0]
    assert result.rank1 == 1.0 and result.tar_at_far["1e-06"] == 1.0


def test_image_lists_and_errors(tmp_path):
    (tmp_path / "fs.json").write_text(json.dumps({"path": ["A/A_1.png", "A/A_2.png"], "id": ["A", "A"]}))
    assert megaface.load_image_list(tmp_path / "fs.json", True) == (["A/A_1.png", "A/A_2.png"], ["A", "A"])
    (tmp_path / "fs.txt").write_text("B/B_1.png\nB/B_2.png other\n")
    assert megaface.load_image_list(tmp_path / "fs.txt", True)[1] == ["B", "other"]
    (tmp_path / "bad.txt").write_text("a b c\n")
    with pytest.raises(ValueError, match="bad.txt line 1"):
        megaface.load_image_list(tmp_path / "bad.txt", True)
    with pytest.raises(ValueError, match="every image is on the noise list"):
        megaface.refine_probes(np.ones((2, 4)), ["q", "q"], np.array([True, True]))


def test_overlapping_identities():
    train = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0.7]])
    facescrub = np.array([[0.9, 0.1, 0.0]])
    np.testing.assert_array_equal(megaface.overlapping_identities(train, facescrub, 0.4), [0, 2])
