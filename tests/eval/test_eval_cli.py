"""``arcface-eval`` MegaFace end to end: images -> devkit feature files -> report, vs a numpy brute force."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from arcface.checkpoint import save_backbone_checkpoint
from backbones import create_backbone
from eval import megaface
from eval.cli import main
from recordio_tools.synth import render_identity_image

PROBE_IDS = {"Ann_A": 0, "Bob_B": 1, "Cid_C": 2, "Dee_D": 3}
IMAGES_PER_PROBE_ID = 3
NUM_DISTRACTORS = 24
SIZES = (10, 24)


@pytest.fixture(scope="module")
def megaface_setup(tmp_path_factory):
    """Probe / distractor PNG trees, list files, noise lists and a small checkpoint."""
    root = tmp_path_factory.mktemp("megaface_cli")
    probe_names = []
    for name, identity in PROBE_IDS.items():
        for k in range(IMAGES_PER_PROBE_ID):
            rel = f"{name}/{name}_{k}.png"
            (root / "fs" / name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "fs" / rel), render_identity_image(identity, k, seed=3))
            probe_names.append(rel)
    distractor_names = []
    for k in range(NUM_DISTRACTORS):
        rel = f"{k % 3}/d{k:03d}.jpg"
        (root / "mf" / str(k % 3)).mkdir(parents=True, exist_ok=True)
        # Distractors from other identities, a few "lookalikes" of the probe identities (the noisy ones).
        identity = 10 + k if k % 7 else k % 4
        cv2.imwrite(str(root / "mf" / rel), render_identity_image(identity, 50 + k, seed=3))
        distractor_names.append(rel)
    # Probe list: text, identity from the parent folder; distractor list: devkit JSON.
    (root / "facescrub.txt").write_text("\n".join(probe_names) + "\n")
    (root / "megaface.json").write_text(json.dumps({"path": distractor_names}))
    probe_noise = ["Bob_B_2.png"]                     # base name, as in the devkit noise list
    distractor_noise = [distractor_names[7], distractor_names[14]]
    (root / "fs_noise.txt").write_text("\n".join(probe_noise) + "\n")
    (root / "mf_noise.txt").write_text("\n".join(distractor_noise) + "\n")

    torch.manual_seed(0)
    model = create_backbone("mobilefacenet_s", embedding_size=32)
    # A random net maps every face to nearly the same direction (cosines ~1 - 1e-8: float ties). BN
    # statistics of these very images (cumulative average) centre every layer, the last BN included, so
    # the embeddings spread out and the float32 search can be compared exactly with a float64 one.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    images = [cv2.imread(str(root / "fs" / n))[:, :, ::-1] for n in probe_names]
    images += [cv2.imread(str(root / "mf" / n))[:, :, ::-1] for n in distractor_names]
    batch = torch.from_numpy((np.stack(images).astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    model.train()
    with torch.no_grad():
        model(torch.cat([batch, torch.flip(batch, dims=[3])]))
    ckpt = save_backbone_checkpoint(root / "ckpt", model.eval(),
                                    {"backbone": {"name": "mobilefacenet_s", "embedding_size": 32}})
    return {"root": root, "probes": probe_names, "distractors": distractor_names, "model": model,
            "ckpt": ckpt, "probe_noisy": np.array([n.endswith("Bob_B_2.png") for n in probe_names]),
            "distractor_noisy": np.isin(distractor_names, distractor_noise)}


def reference_flip_sum(model, path):
    """Independent embedding of one image file: decode, BGR->RGB, (x-127.5)/127.5, f(x) + f(mirror x)."""
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32)
    x = torch.from_numpy(((rgb - 127.5) / 127.5).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        return (model(x) + model(torch.flip(x, dims=[3])))[0].numpy()


def brute_force(probes, probe_ids, probe_noisy, distractors, distractor_noisy, size, max_rank=10):
    """Dense float64 MegaFace evaluation (refined protocol) written from the protocol text."""
    p = probes.astype(np.float64)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    ids = np.asarray(probe_ids)
    for i in np.nonzero(probe_noisy)[0]:
        clean = (ids == ids[i]) & ~probe_noisy
        centre = p[clean].mean(axis=0)
        p[i] = centre / np.linalg.norm(centre)
    d = distractors[:size].astype(np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    d = d[~distractor_noisy[:size]]
    dense = p @ d.T
    ranks, genuine = [], []
    for a in range(len(ids)):
        for b in range(len(ids)):
            if a != b and ids[a] == ids[b]:
                s = p[a] @ p[b]
                # Precondition of an exact comparison with the float32 search: no near-tie.
                assert np.abs(dense[a] - s).min() > 1e-4
                ranks.append(1 + int((dense[a] >= s).sum()))
                if a < b:
                    genuine.append(s)
    ranks = np.array(ranks)
    cmc = [float(np.mean(ranks <= r)) for r in range(1, max_rank + 1)]
    # FAR 1e-6 of len(ids) * clean impostors allows zero false accepts: accept only above the top impostor.
    tar = float(np.mean(np.array(genuine) > dense.max()))
    return ranks.size, cmc, tar


def check_report(report, setup, probes, distractors, fp16=False):
    assert [r["num_distractors"] for r in report["megaface"]] == list(SIZES)
    if fp16:  # what the fp16 store holds: the normalised features rounded to half precision
        distractors = (distractors / np.linalg.norm(distractors, axis=1, keepdims=True)).astype(np.float16)
    for entry, size in zip(report["megaface"], SIZES):
        searches, cmc, tar = brute_force(probes, [n.split("/")[0] for n in setup["probes"]],
                                         setup["probe_noisy"], distractors, setup["distractor_noisy"], size)
        assert entry["num_searches"] == searches == len(PROBE_IDS) * IMAGES_PER_PROBE_ID * 2
        np.testing.assert_allclose(entry["cmc"], cmc, atol=1e-12)
        assert entry["rank1"] == pytest.approx(cmc[0])
        assert entry["tar_at_far"]["1e-06"] == pytest.approx(tar)
    table = {(row["target"], row["metric"]): row["value"] for row in report["table"]}
    assert table[(f"MegaFace ({SIZES[-1]} distractors)", "rank-1 identification")] == \
        f"{100 * report['megaface'][-1]['rank1']:.2f}%"
    assert "cmc_megaface.png" in report["plots"]


@pytest.mark.slow
def test_megaface_from_images_then_from_feature_folders(megaface_setup, tmp_path):
    setup = megaface_setup
    root = setup["root"]
    out = tmp_path / "report"
    sizes = ",".join(map(str, SIZES)) + ",1000000"  # clipped to the list length
    common = ["--megaface-probes", str(root / "facescrub.txt"), "--megaface-distractors",
              str(root / "megaface.json"), "--megaface-sizes", sizes, "--facescrub-noise",
              str(root / "fs_noise.txt"), "--megaface-noise", str(root / "mf_noise.txt")]
    assert main(["--model", str(setup["ckpt"]), "--output", str(out), "--batch-size", "8",
                 "--megaface-probe-root", str(root / "fs"), "--megaface-distractor-root", str(root / "mf"),
                 *common]) == 0

    feature_root = out / "megaface_features"
    probes = np.stack([megaface.read_feature(megaface.feature_path(feature_root / "facescrub", n, "_arcface"))
                       for n in setup["probes"]])
    distractors = np.stack([megaface.read_feature(megaface.feature_path(feature_root / "megaface", n,
                                                                        "_arcface"))
                            for n in setup["distractors"]])
    # The feature files hold the flip-sum embeddings of the image files.
    for name, feature in zip(setup["probes"][:3] + setup["distractors"][:3], [*probes[:3], *distractors[:3]]):
        folder = "fs" if name in setup["probes"] else "mf"
        np.testing.assert_allclose(feature, reference_flip_sum(setup["model"], root / folder / name),
                                   rtol=1e-4, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    check_report(report, setup, probes, distractors)
    assert (out / "cmc_megaface.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".megaface_distractors.scratch-*"))  # the memory-map scratch file is gone

    # Same features from the devkit folders, distractors memory-mapped in fp16, no model needed.
    out16 = tmp_path / "report16"
    assert main(["--output", str(out16), "--megaface-probe-features", str(feature_root / "facescrub"),
                 "--megaface-distractor-features", str(feature_root / "megaface"), "--megaface-fp16",
                 *common]) == 0
    check_report(json.loads((out16 / "report.json").read_text()), setup, probes, distractors, fp16=True)
    assert (out16 / "cmc_megaface.png").is_file()


def test_megaface_feature_cache_refuses_another_model(megaface_setup, tmp_path, capsys):
    """Features embedded by one model are never silently reused for another one."""
    setup = megaface_setup
    root = setup["root"]
    probes = tmp_path / "fs.txt"
    probes.write_text("\n".join(setup["probes"][:6]) + "\n")
    distractors = tmp_path / "mf.txt"
    distractors.write_text("\n".join(setup["distractors"][:3]) + "\n")
    args = ["--output", str(tmp_path / "out"), "--megaface-probes", str(probes), "--megaface-probe-root",
            str(root / "fs"), "--megaface-distractors", str(distractors), "--megaface-distractor-root",
            str(root / "mf"), "--megaface-sizes", "3", "--batch-size", "8"]
    assert main(["--model", str(setup["ckpt"]), *args]) == 0
    other_model = create_backbone("mobilefacenet_s", embedding_size=32)
    other = save_backbone_checkpoint(tmp_path / "other", other_model,
                                     {"backbone": {"name": "mobilefacenet_s", "embedding_size": 32}})
    capsys.readouterr()
    assert main(["--model", str(other), *args]) == 2
    assert "made with" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_image", "bad_list", "bad_sizes"])
def test_megaface_bad_input_names_the_file(megaface_setup, tmp_path, capsys, case):
    setup = megaface_setup
    root = setup["root"]
    probes = tmp_path / "fs.txt"
    probes.write_text("Ann_A/Ann_A_0.png\nAnn_A/Ann_A_1.png\n")
    sizes = "2"
    if case == "missing_image":
        probes.write_text("Ann_A/Ann_A_0.png\nAnn_A/Ann_A_9.png\n")
        expected = "Ann_A_9.png"
    elif case == "bad_list":
        probes.write_text("Ann_A/Ann_A_0.png Ann extra\n")
        expected = "fs.txt line 1"
    else:
        sizes = "10,many"
        expected = "--megaface-sizes"
    distractors = tmp_path / "mf.txt"
    distractors.write_text("\n".join(setup["distractors"][:2]) + "\n")
    status = main(["--model", str(setup["ckpt"]), "--output", str(tmp_path / "out"),
                   "--megaface-probes", str(probes), "--megaface-probe-root", str(root / "fs"),
                   "--megaface-distractors", str(distractors), "--megaface-distractor-root", str(root / "mf"),
                   "--megaface-sizes", sizes])
    assert status == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any progress bars
    assert last.startswith("arcface-eval: error:") and expected in last and "Traceback" not in err
