"""arcface-embed: a folder embedded with the checkpoint and with its ONNX export gives the same vectors,
which equal a hand-computed PyTorch reference; list files, flip-sum, normalisation, landmark alignment
and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from arcface.checkpoint import load_backbone, save_backbone_checkpoint
from arcface.config import load_config
from arcface.deploy import embed, export
from backbones import create_backbone
from recordio_tools.align import align_face
from recordio_tools.synth import render_identity_image, render_identity_sample

EMBEDDING_SIZE = 16


# Forward-heavy tests: one intra-op thread (see tests/conftest.py::single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A mobilefacenet checkpoint with non-trivial BN statistics, and its ONNX export."""
    root = tmp_path_factory.mktemp("embed_models")
    config = load_config(None, ["backbone.name=mobilefacenet",
                                f"backbone.embedding_size={EMBEDDING_SIZE}"]).to_dict()
    torch.manual_seed(0)
    model = create_backbone("mobilefacenet", embedding_size=EMBEDDING_SIZE)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 112, 112) * 2 - 1)  # running stats = real batch statistics
    checkpoint = save_backbone_checkpoint(root / "ckpt", model.eval(), config, step=1)
    proto, _ = export.export_model(load_backbone(checkpoint)[0])
    onnx_path = root / "model.onnx"
    onnx.save(proto, str(onnx_path))
    return checkpoint, onnx_path


@pytest.fixture()
def faces(tmp_path) -> Path:
    """Six aligned synthetic faces in two identity folders (PNG: lossless, so references are exact)."""
    folder = tmp_path / "faces"
    for identity in range(2):
        (folder / f"id{identity}").mkdir(parents=True)
        for index in range(3):
            face = render_identity_image(identity, index, 5)
            cv2.imwrite(str(folder / f"id{identity}" / f"{index}.png"), face)
    (folder / "notes.txt").write_text("not an image")
    return folder


def reference_embeddings(checkpoint: Path, paths: list[Path], flip_sum: bool = False) -> np.ndarray:
    """PyTorch eager on inputs prepared by hand: cv2.imread (BGR) -> RGB -> (p - 127.5) / 127.5."""
    model, _ = load_backbone(checkpoint)
    rgb = np.stack([cv2.imread(str(p))[:, :, ::-1] for p in paths]).astype(np.float32)
    inputs = torch.from_numpy(((rgb - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model(inputs)
        if flip_sum:
            out = out + model(torch.flip(inputs, dims=[3]))
    return out.numpy()


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.99999
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_folder_with_checkpoint_and_onnx_gives_the_same_vectors(models, faces, tmp_path):
    checkpoint, onnx_path = models
    assert embed.main(["--model", str(checkpoint), str(faces), "-o", str(tmp_path / "ckpt.npy"),
                       "--batch-size", "4", "-q"]) == 0
    assert embed.main(["--model", str(onnx_path), str(faces), "-o", str(tmp_path / "onnx"),
                       "--batch-size", "4", "-q"]) == 0
    names = (tmp_path / "ckpt.index.txt").read_text().splitlines()
    assert names == [f"id{i}/{j}.png" for i in range(2) for j in range(3)]
    assert (tmp_path / "onnx.index.txt").read_text().splitlines() == names
    from_checkpoint, from_onnx = np.load(tmp_path / "ckpt.npy"), np.load(tmp_path / "onnx.npy")
    assert from_checkpoint.dtype == np.float32 and from_checkpoint.shape == (6, EMBEDDING_SIZE)
    assert_close(from_onnx, from_checkpoint)
    assert_close(from_checkpoint, reference_embeddings(checkpoint, [faces / n for n in names]))
    summary = json.loads((tmp_path / "onnx.json").read_text())
    assert summary["count"] == 6 and summary["flip_sum"] is False and summary["normalized"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_list_file_order_flip_sum_and_normalize(models, faces, tmp_path):
    checkpoint, onnx_path = models
    order = ["id1/2.png", "id0/0.png", "id1/0.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen faces\n" + "".join(f"{name}\t7\n" for name in order))
    out = tmp_path / "emb.npy"
    assert embed.main(["--model", str(onnx_path), str(listing), "--root", str(faces), "-o", str(out),
                       "--flip-sum", "-q"]) == 0
    assert (tmp_path / "emb.index.txt").read_text().splitlines() == order
    assert_close(np.load(out), reference_embeddings(checkpoint, [faces / n for n in order], flip_sum=True))
    assert embed.main(["--model", str(checkpoint), str(listing), "--root", str(faces), "-o", str(out),
                       "--normalize", "--overwrite", "-q"]) == 0
    normalised = np.load(out)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-5)
    reference = reference_embeddings(checkpoint, [faces / n for n in order])
    assert_close(normalised, reference / np.linalg.norm(reference, axis=1, keepdims=True))


def _photo(identity: int, angle_deg: float, scale: float, shift: tuple[float, float]):
    """An unaligned 'photo': a synthetic face warped by a known similarity onto a larger canvas, with its
    5 landmarks moved by the same transform."""
    face, landmarks = render_identity_sample(identity, 0, seed=5)
    angle = math.radians(angle_deg)
    linear = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = np.concatenate([linear, np.array(shift, dtype=np.float64)[:, None]], axis=1)
    photo = cv2.warpAffine(face, matrix, (260, 240), flags=cv2.INTER_LINEAR)
    return photo, landmarks @ linear.T + matrix[:, 2]


def test_align_landmarks_uses_the_shared_aligner(models, tmp_path):
    _, onnx_path = models
    photos, aligned = tmp_path / "photos", tmp_path / "aligned"
    photos.mkdir()
    aligned.mkdir()
    lines = []
    for identity, (angle, scale, shift) in enumerate([(15.0, 1.6, (60.0, 20.0)), (-25.0, 1.9, (40.0, 70.0))]):
        photo, points = _photo(identity, angle, scale, shift)
        cv2.imwrite(str(photos / f"p{identity}.png"), photo)
        lines.append(f"p{identity}.png " + " ".join(f"{v:.4f}" for v in points.ravel()))
        # The reference: the same photo aligned by hand with the landmarks as written in the file.
        written = np.array([float(v) for v in lines[-1].split()[1:]]).reshape(5, 2)
        cv2.imwrite(str(aligned / f"p{identity}.png"), align_face(photo, written))
    landmark_file = tmp_path / "landmarks.txt"
    landmark_file.write_text("\n".join(lines) + "\n")
    assert embed.main(["--model", str(onnx_path), str(photos), "-o", str(tmp_path / "a.npy"),
                       "--align-landmarks", str(landmark_file), "-q"]) == 0
    assert embed.main(["--model", str(onnx_path), str(aligned), "-o", str(tmp_path / "b.npy"), "-q"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    # Alignment recovers the face: the aligned photo is close to the original aligned render.
    original = render_identity_sample(0, 0, seed=5)[0].astype(np.float32)
    recovered = cv2.imread(str(aligned / "p0.png")).astype(np.float32)
    assert np.abs(recovered - original)[16:96, 16:96].mean() < 12.0


@pytest.mark.parametrize("case, message", [
    ("exists", "--overwrite"),
    ("corrupt", "does not decode"),
    ("empty", "no images"),
    ("missing_in_list", "list.txt:2: image 'nope.png' not found"),
    ("bad_landmarks", "landmarks.txt:1: expected an image path and 10 landmark values"),
    ("no_landmarks_for_image", "no landmarks for 5 image(s)"),
    ("bad_model", "no such checkpoint"),
])
def test_bad_inputs_fail_clearly_and_write_nothing(models, faces, tmp_path, capsys, case, message):
    checkpoint, onnx_path = models
    out = tmp_path / "out.npy"
    args = ["--model", str(onnx_path), str(faces), "-o", str(out), "-q"]
    if case == "exists":
        out.write_bytes(b"keep me")
    elif case == "corrupt":
        (faces / "id0" / "1.png").write_bytes(b"\x89PNG broken")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[2] = str(tmp_path / "empty")
    elif case == "missing_in_list":
        (faces / "list.txt").write_text("id0/0.png\nnope.png\n")
        args[2] = str(faces / "list.txt")
    elif case == "bad_landmarks":
        (tmp_path / "landmarks.txt").write_text("id0/0.png 1 2 3\n")
        args += ["--align-landmarks", str(tmp_path / "landmarks.txt")]
    elif case == "no_landmarks_for_image":
        (tmp_path / "landmarks.txt").write_text("id0/0.png " + " ".join(["50"] * 10) + "\n")
        args += ["--align-landmarks", str(tmp_path / "landmarks.txt")]
    else:
        args[1] = str(tmp_path / "no_checkpoint_here")
    assert embed.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists() and not (tmp_path / "out.index.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
