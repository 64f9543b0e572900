"""Evaluation output that cannot mislead: the evaluated checkpoint is named (path, step, config digest), VAL
is printed with the FAR actually reached, and a collapsed model is reported as such."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import backbones
from arcface.checkpoint import save_backbone_checkpoint, step_dirname
from eval import metrics, verification
from eval.cli import main as eval_main
from eval.report import write_report
from recordio_tools.verification_bin import write_bin


def _pairs(n_pairs: int) -> np.ndarray:
    return np.arange(n_pairs) % 2 == 0


def _separable_embeddings(n_pairs: int, seed: int = 0) -> np.ndarray:
    """Pairs of noisy copies of one identity (same) or of two identities (different): continuous scores."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 64))
    rows = []
    for same in _pairs(n_pairs):
        a = rng.integers(0, 40)
        b = a if same else (a + 1 + rng.integers(0, 39)) % 40
        rows += [centres[a], centres[b]]
    return np.asarray(rows) + 0.5 * rng.normal(size=(2 * n_pairs, 64))


@pytest.mark.parametrize("embeddings", [
    np.ones((600, 16)),                                                       # every embedding equal
    np.zeros((600, 16)),                                                      # a dead model
    np.ones((600, 16)) + 1e-4 * np.random.default_rng(0).normal(size=(600, 16)),  # equal up to noise
])
def test_collapsed_model_is_reported_as_such(embeddings):
    result = verification.evaluate_embeddings("heldout", embeddings, _pairs(300))
    # What the protocol says about such a model: chance accuracy at threshold 0 and VAL 100%, at FAR 1.
    assert result.accuracy_mean == 0.5 and result.accuracy_std == 0.0 and result.best_threshold == 0.0
    assert result.val_at_far_1e3 == 1.0 and result.far_at_val == 1.0
    assert result.collapsed and not result.val_far_reachable and result.val_far_target == 1e-3
    assert result.distance_spread < verification.COLLAPSE_SPREAD
    summary = result.summary()
    assert "VAL 100.00% @ FAR 1 (target 1e-3 not reachable)" in summary
    assert "COLLAPSED MODEL" in summary and "VAL@FAR=1e-3 100.00%" not in summary
    record = result.to_dict()
    assert record["collapsed"] is True and record["val_far_reachable"] is False
    assert record["val_far_target"] == 1e-3 and record["far_at_val"] == 1.0


def test_healthy_model_is_not_flagged_and_shows_the_far_reached():
    issame = _pairs(3000)
    result = verification.evaluate_embeddings("lfw_like", _separable_embeddings(3000), issame)
    assert not result.collapsed and result.val_far_reachable
    assert 0.9 < result.accuracy_mean < 1.0
    # A threshold set at FAR 1e-3 on 1,350 training impostors accepts a fraction of an impostor of each
    # held-out fold's 150: over the 1,500 impostors the false accepts stay in single digits.
    assert 0 <= result.far_at_val <= 10 / 1500
    far_text = verification.format_far(result.far_at_val)
    assert f"@ FAR {far_text} (target 1e-3)," in result.summary()
    assert "WARNING" not in result.summary()


def test_spread_just_above_the_threshold_step_is_not_collapsed():
    rng = np.random.default_rng(3)
    unit = np.tile(np.eye(8)[0], (400, 1))
    # Tilt the second image of each pair so the squared distances spread over [0, 0.02].
    angles = np.sqrt(rng.uniform(0.0, 0.02, size=200))
    unit[1::2, 0], unit[1::2, 1] = np.cos(angles), np.sin(angles)
    result = verification.evaluate_embeddings("tilted", unit, _pairs(200))
    assert result.distance_spread > verification.COLLAPSE_SPREAD and not result.collapsed


def test_far_target_out_of_reach_when_impostor_scores_jump():
    """Half the impostor pairs share one distance below every other: no threshold gives FAR 1e-3."""
    n = 2000
    issame = _pairs(n)
    rng = np.random.default_rng(1)
    distances = np.where(issame, rng.uniform(0.2, 0.6, n), rng.uniform(1.2, 2.0, n))
    impostor = np.nonzero(~issame)[0]
    distances[impostor[::2]] = 1.0
    detail = metrics.val_at_far_detail(distances, issame, 1e-3)
    assert not detail.reachable
    # Each fold's threshold accepts the tied half of its training impostors (brute force from the data).
    assert np.allclose(detail.train_far, 0.5, atol=0.02)
    assert detail.far == pytest.approx(0.5, abs=0.05) and detail.val == 1.0
    # Continuous impostor scores: every fold reaches the target on its training pairs.
    distances[impostor[::2]] = rng.uniform(1.2, 2.0, impostor[::2].size)
    detail = metrics.val_at_far_detail(distances, issame, 1e-3)
    assert detail.reachable and (detail.train_far <= 2e-3 + 1 / 900).all()
    assert metrics.val_at_far(distances, issame, 1e-3) == (detail.val, detail.val_std, detail.far)


def test_format_far():
    assert [verification.format_far(x) for x in (0, 1e-3, 1.4e-4, 3.3e-3, 0.0123, 0.5, 1.0)] == \
        ["0", "1e-3", "1.4e-4", "3.3e-3", "0.012", "0.5", "1"]


def test_report_names_the_model_and_carries_the_warnings(tmp_path):
    identity = {"given": "runs/r100", "kind": "checkpoint", "step": 12,
                "path": "/abs/runs/r100/checkpoints/step_00000012", "config_sha256": "0123456789abcdef" * 4}
    collapsed = verification.evaluate_embeddings("heldout", np.ones((40, 8)), _pairs(20))
    healthy = verification.evaluate_embeddings("other", _separable_embeddings(100), _pairs(100))
    report_md = write_report(tmp_path, identity, [collapsed, healthy])
    text = report_md.read_text()
    assert ("- model: /abs/runs/r100/checkpoints/step_00000012 (checkpoint, step 12, config sha256 "
            "0123456789ab)") in text
    assert "- model as given: `runs/r100`" in text
    assert "> **Warning:** heldout: COLLAPSED MODEL" in text
    assert ("> **Warning:** heldout: no threshold reaches FAR 1e-3; VAL 100.00% is measured at FAR 1"
            in text)
    assert "other:" not in text.split("| target |")[0]  # no warning for the healthy pack
    assert "| heldout | accuracy (10-fold) | 50.00% +- 0.00% (COLLAPSED MODEL: chance) |" in text
    assert ("| heldout | VAL at FAR target 1e-3 | 100.00% +- 0.00% at FAR 1 (target not reachable) |"
            in text)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == identity
    assert len(report["warnings"]) == 2
    entry = {r["name"]: r for r in report["verification"]}
    assert entry["heldout"]["collapsed"] is True and entry["heldout"]["val_far_reachable"] is False
    assert entry["heldout"]["val_far_target"] == 1e-3 and entry["heldout"]["far_at_val"] == 1.0
    assert entry["other"]["collapsed"] is False and entry["other"]["val_far_reachable"] is True


class _PoolNet(nn.Module):
    """A tiny deterministic backbone: 8x8 average pooling and a linear layer."""

    def __init__(self, embedding_size: int = 16, **_: object) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.fc = nn.Linear(3 * 64, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


def _pack(path, n_pairs=20, seed=0):
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(n_pairs):
        for _ in range(2):
            image = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            bins.append(cv2.imencode(".png", image)[1].tobytes())
        issame.append(i % 2 == 0)
    return write_bin(path, bins, issame)


def _canonical_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_eval_names_the_checkpoint_a_run_folder_resolves_to(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(backbones._REGISTRY, "poolnet_test", _PoolNet)
    run = tmp_path / "run"
    torch.manual_seed(0)
    for step, lr in ((2, 0.1), (5, 0.2)):
        config = {"backbone": {"name": "poolnet_test", "embedding_size": 16}, "optim": {"lr": lr}}
        save_backbone_checkpoint(run / "checkpoints" / step_dirname(step), _PoolNet(), config, step=step)
    latest = run / "checkpoints" / step_dirname(5)
    digest = _canonical_sha256(json.loads((latest / "meta.json").read_text())["config"])
    pack = _pack(tmp_path / "pairs.bin")
    out = tmp_path / "report"
    assert eval_main(["--model", str(run), "-o", str(out), "--bin", str(pack), "-q"]) == 0
    captured = capsys.readouterr()
    assert f"model: {latest.resolve()} (checkpoint, step 5, config sha256 {digest[:12]})" in captured.out
    assert "embed pairs" not in captured.err  # -q: no progress bars
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"given": str(run), "kind": "checkpoint", "path": str(latest.resolve()),
                               "step": 5, "config_sha256": digest}
    text = (out / "report.md").read_text()
    assert f"- model: {latest.resolve()} (checkpoint, step 5, config sha256 {digest[:12]})" in text
    assert f"- model as given: `{run}`" in text
    # Without -q the progress bar is shown.
    assert eval_main(["--model", str(latest), "-o", str(tmp_path / "r2"), "--bin", str(pack)]) == 0
    assert "embed pairs" in capsys.readouterr().err


def _constant_onnx(path, step="7", config_sha256="ab" * 32):
    """A model that maps every image to the same embedding (ones), with arcface-export's metadata."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Unsqueeze", ["mean", "axis"], ["column"]),
         helper.make_node("Mul", ["column", "zero"], ["zeros"]),
         helper.make_node("Add", ["zeros", "ones"], ["embedding"])],
        "constant",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
         numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
         numpy_helper.from_array(np.ones((1, 8), np.float32), "ones")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (("checkpoint_step", step), ("config_sha256", config_sha256)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_eval_reports_a_collapsed_onnx_model(tmp_path, capsys):
    model = _constant_onnx(tmp_path / "model.onnx")
    pack = _pack(tmp_path / "heldout.bin", n_pairs=40)
    out = tmp_path / "report"
    assert eval_main(["--model", str(model), "-o", str(out), "--bin", str(pack), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"model: {model.resolve()} (onnx, step 7, config sha256 {'ab' * 6})" in printed
    line = next(line for line in printed.splitlines() if line.startswith("heldout:"))
    assert "accuracy 50.00 +- 0.00%" in line and "VAL 100.00% @ FAR 1 (target 1e-3 not reachable)" in line
    assert "WARNING: COLLAPSED MODEL: all 40 pair distances are equal" in line
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["step"] == 7 and report["model"]["config_sha256"] == "ab" * 32
    result = report["verification"][0]
    assert result["collapsed"] is True and result["val_far_reachable"] is False
    assert "COLLAPSED MODEL" in (out / "report.md").read_text()
    # An ONNX file without the export metadata: step and config are "unknown", not invented.
    bare = onnx.load(str(model))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert eval_main(["--model", str(tmp_path / "bare.onnx"), "-o", str(tmp_path / "r2"), "--bin", str(pack),
                      "-q"]) == 0
    assert "(onnx, step unknown, config unknown)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["model"]["step"] is None
