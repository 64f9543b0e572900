"""Verification packs end to end, embedder parity (live model / checkpoint / ONNX), distributed, CLI."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from eval import cli, metrics, verification
from eval.embedder import CheckpointEmbedder, ModelEmbedder, OnnxEmbedder, build_embedder, embed_encoded
from recordio_tools.verification_bin import write_bin
from tests.dist_utils import run_distributed


class IdentityPainter:
    """Embedder that reads the identity painted into the image: maps identity -> fixed vector."""

    embedding_size = 32

    def __init__(self, random: bool = False):
        self.random = random
        self.rng = np.random.default_rng(5)

    def embed_images(self, rgb):
        if self.random:
            return self.rng.normal(size=(rgb.shape[0], 32)).astype(np.float32)
        identity = np.rint(rgb[:, 56, 56, 1] / 8.0).astype(int)
        return np.eye(32, dtype=np.float32)[identity] * 2


def make_pack(path, n_pairs=200, seed=0):
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(n_pairs):
        same = i % 2 == 0
        a = int(rng.integers(0, 30))
        b = a if same else int((a + 1 + rng.integers(0, 29)) % 30)
        for identity in (a, b):
            image = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            image[40:72, 40:72, 1] = 8 * identity
            bins.append(cv2.imencode(".png", image)[1].tobytes())
        issame.append(same)
    write_bin(path, bins, issame)
    return path


def test_perfect_and_random_embedders(tmp_path):
    pack = verification.load_pack(make_pack(tmp_path / "synth.bin"))
    perfect = verification.evaluate_pack(IdentityPainter(), pack, batch_size=16)
    assert perfect.accuracy_mean == 1.0 and perfect.accuracy_std == 0.0 and perfect.val_at_far_1e3 == 1.0
    assert perfect.norm_mean == pytest.approx(2.0)
    chance = verification.evaluate_pack(IdentityPainter(random=True), pack, batch_size=16)
    assert 0.35 < chance.accuracy_mean < 0.65


def test_result_equals_protocol_on_direct_embeddings(tmp_path):
    pack = verification.load_pack(make_pack(tmp_path / "p.bin", n_pairs=60, seed=1))
    embedder = IdentityPainter(random=True)
    result = verification.evaluate_pack(embedder, pack, batch_size=7)
    embedder.rng = np.random.default_rng(5)  # replay the same "model"
    images = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                                    cv2.COLOR_BGR2RGB) for b in pack.bins])
    embeddings = np.concatenate([embedder.embed_images(images[i:i + 7]) for i in range(0, len(images), 7)])
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = ((unit[0::2] - unit[1::2]) ** 2).sum(axis=1)
    expected = metrics.kfold_accuracy(distances, pack.issame)
    assert result.accuracy_mean == pytest.approx(expected.accuracy.mean())
    assert result.norm_mean == pytest.approx(np.linalg.norm(embeddings, axis=1).mean(), rel=1e-5)


def test_golden_pack_and_bad_packs(tmp_path, data_dir):
    golden = verification.load_pack(data_dir / "mxnet_golden" / "pairs.bin")
    assert golden.num_pairs == 12 and golden.issame.tolist() == [True, False] * 6

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil()] * 20, [True] * 10)))
    with pytest.raises(ValueError, match="refusing to unpickle global builtins.print"):
        verification.load_pack(evil)
    make_pack(tmp_path / "lfw.bin", n_pairs=20)
    with pytest.raises(ValueError, match="the standard lfw pack has 6000"):
        verification.load_pack(tmp_path / "lfw.bin")
    assert verification.load_pack(tmp_path / "lfw.bin", check_count=False).num_pairs == 20
    write_bin(tmp_path / "tiny.bin", [b"x"] * 8, [True] * 4)
    with pytest.raises(ValueError, match="at least 10"):
        verification.load_pack(tmp_path / "tiny.bin")
    write_bin(tmp_path / "broken.bin", [b"not an image"] * 20, [True] * 10)
    with pytest.raises(ValueError, match=r"broken.bin image 0: image data does not decode"):
        verification.evaluate_pack(IdentityPainter(), verification.load_pack(tmp_path / "broken.bin"))


@pytest.fixture
def small_backbone():
    from backbones import create_backbone

    return "mobilefacenet", create_backbone("mobilefacenet", embedding_size=64)


@pytest.mark.slow
def test_embedder_parity_model_checkpoint_onnx(tmp_path, small_backbone):
    from arcface.checkpoint import save_backbone_checkpoint

    name, model = small_backbone
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics so eval-mode really matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.train()  # the training loop hands over a model in train mode
    ckpt = save_backbone_checkpoint(tmp_path / "ckpt", model,
                                    {"backbone": {"name": name, "embedding_size": 64}})
    onnx_path = tmp_path / "model.onnx"
    model.eval()
    torch.onnx.export(model, torch.zeros(2, 3, 112, 112), onnx_path, input_names=["input"],
                      output_names=["embedding"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    model.train()
    images = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    live = ModelEmbedder(model, batch_size=3)
    live_out = live.embed_images(images)
    assert model.training  # restored
    ckpt_out = CheckpointEmbedder(ckpt, batch_size=2).embed_images(images)
    onnx_out = OnnxEmbedder(onnx_path, batch_size=4).embed_images(images)
    assert isinstance(build_embedder(onnx_path), OnnxEmbedder)
    np.testing.assert_allclose(ckpt_out, live_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_out, live_out, rtol=1e-3, atol=1e-3)
    # Flip-sum really is f(x) + f(mirror x), with the mirror taken from the preprocessing module.
    single = ModelEmbedder(model, flip=False)
    expected = single.embed_images(images) + single.embed_images(np.ascontiguousarray(images[:, :, ::-1]))
    np.testing.assert_allclose(live_out, expected, rtol=1e-4, atol=1e-4)
    # Streaming encoded images gives the same embeddings as embedding decoded arrays.
    encoded = [cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in images]
    streamed = embed_encoded(live, iter(encoded), batch_size=2)
    np.testing.assert_allclose(streamed, live_out, rtol=1e-5, atol=1e-5)

    # CLI end to end on the ONNX model: report files, and a clear error for a bad pack.
    make_pack(tmp_path / "synth.bin", n_pairs=20)
    out = tmp_path / "report"
    assert cli.main(["--model", str(onnx_path), "--output", str(out), "--batch-size", "8",
                     "--bin", f"mine={tmp_path / 'synth.bin'}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verification"][0]["name"] == "mine" and report["verification"][0]["num_pairs"] == 20
    assert (out / "report.md").read_text().count("| mine |") == 5
    assert (out / "roc_verification.png").stat().st_size > 0 and (out / "hist_mine.png").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["--output", str(tmp_path / "o"), "--bin", str(tmp_path / "missing.bin"),
                     "--model", str(tmp_path / "m.onnx")]) == 2
    assert "m.onnx: no such ONNX model" in capsys.readouterr().err
    assert cli.main(["--output", str(tmp_path / "o")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


class PixelEmbedder:
    """Deterministic, imperfect, content-dependent: a mis-ordered gather would change every number."""

    embedding_size = 64

    def embed_images(self, rgb):
        return rgb[:, ::14, ::14, 1].reshape(rgb.shape[0], -1).astype(np.float32) / 255.0


def _rank_eval(rank, world_size, path):
    pack = verification.load_pack(path)
    result = verification.evaluate_pack(PixelEmbedder(), pack, batch_size=8, rank=rank,
                                        world_size=world_size)
    return result.to_dict()


@pytest.mark.distributed
def test_distributed_evaluation_equals_single_process(tmp_path):
    path = make_pack(tmp_path / "d.bin", n_pairs=41, seed=3)  # 82 images: uneven 3-way split
    single = verification.evaluate_pack(PixelEmbedder(), verification.load_pack(path)).to_dict()
    assert 0.5 < single["accuracy_mean"] < 1.0
    results = run_distributed(_rank_eval, world_size=3, args=(str(path),), timeout_s=120)
    for result in results:
        for key in ("accuracy_mean", "val_at_far_1e3", "best_threshold", "norm_mean", "fold_accuracy"):
            assert result[key] == single[key]
