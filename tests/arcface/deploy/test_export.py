"""ONNX export: every backbone exports with parity, the graph meets the deployment contract, the BN
folding pass is exact against onnxruntime's own BatchNormalization, the model card's thresholds match
a brute-force recomputation, and each bad input fails clearly without leaving a model.onnx behind.

References are independent of the code under test: PyTorch eager on the checkpoint rebuilt by
``load_backbone``, onnxruntime running the *unfolded* graph, OpenCV's ``blobFromImages`` (what
InsightFace's loader feeds), and sorted impostor scores for thresholds.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import arcface
import backbones
from arcface import preprocess
from arcface.checkpoint import load_backbone, save_backbone_checkpoint
from arcface.config import load_config
from arcface.deploy import export
from backbones import create_backbone, list_backbones

DEEP = {"r100", "r200"}


# Forward-heavy tests: one intra-op thread (see tests/conftest.py::single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(parity_batch_sizes=(1, 4), latency_runs=0, progress=False)


def calibrated(model: nn.Module, seed: int = 0, batch: int = 4) -> nn.Module:
    """Give every BN layer non-trivial statistics and affine parameters, as a trained network has.

    Running statistics are the exact batch statistics of one random batch (momentum None = cumulative
    average), so activations keep a realistic scale through deep nets; gamma/beta are then perturbed so
    that folding them is actually exercised."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(batch, 3, 112, 112, generator=generator) * 2 - 1)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
                n = module.num_features
                if module.weight.requires_grad:  # the E head's BN1d scale is fixed at 1 by design
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def make_checkpoint(root: Path, name: str, embedding_size: int = 32, dropout: float = 0.2) -> Path:
    config = load_config(None, [f"backbone.name={name}", f"backbone.embedding_size={embedding_size}",
                                f"backbone.dropout={dropout}"]).to_dict()
    torch.manual_seed(0)
    model = calibrated(create_backbone(name, embedding_size=embedding_size, dropout=dropout),
                       batch=2 if name in DEEP else 4)
    return save_backbone_checkpoint(root / f"ckpt_{name}", model, config, step=123)


@pytest.fixture()
def tiny(monkeypatch) -> str:
    """A registered stand-in backbone (MobileFaceNet, one unit per stage, width 1) for the tests of the CLI,
    card, variants and error paths: the registry's own networks are covered by the per-backbone test."""
    from backbones.mobilefacenet import MobileFaceNet

    def build(**kwargs: object) -> nn.Module:
        kwargs.pop("gradient_checkpointing", None)
        return MobileFaceNet(blocks=(1, 1, 1, 1), width=1, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setitem(backbones._REGISTRY, "tiny_mbf", build)
    return "tiny_mbf"


def assert_contract(model: onnx.ModelProto, embedding_size: int) -> None:
    """The consumer contract of FORMATS.md section 7, spelled out independently of check_contract."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    assert len(inputs) == 1 and len(graph.output) == 1
    in_dims = inputs[0].type.tensor_type.shape.dim
    assert inputs[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in in_dims[1:]] == [3, 112, 112]
    out = graph.output[0]
    assert out.name == "embedding" and out.type.tensor_type.elem_type == TensorProto.FLOAT
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == embedding_size
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in ops and "Dropout" not in ops
    assert graph.node[0].op_type not in ("Sub", "Mul")
    for node in graph.node[:8]:  # InsightFace's loader decides normalisation from these names
        assert not node.name.startswith(("Sub", "_minus", "Mul", "_mul")), node.name
    assert {t.data_type for t in graph.initializer if t.data_type != TensorProto.INT64} == {TensorProto.FLOAT}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n
                                  for n in list_backbones()])
def test_every_backbone_exports_with_parity_and_contract(name, tmp_path):
    embedding_size = 16 if name in DEEP else 32
    checkpoint = make_checkpoint(tmp_path, name, embedding_size)
    result = export.export_checkpoint(checkpoint, tmp_path / "out", export.ExportOptions(**FAST))

    card = json.loads(result.card_path.read_text())
    assert card["parity"]["passed"] is True
    assert {(r["set"], r["batch"]) for r in card["parity"]["sets"]} == {
        ("faces_b1", 1), ("random_b1", 1), ("faces_b4", 4), ("random_b4", 4)}
    assert all(r["min_cosine"] >= 0.99999 and r["max_abs_diff_rel"] <= 1e-4 for r in card["parity"]["sets"])

    model = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(model)
    assert_contract(model, embedding_size)
    # The file on disk is the graph that was checked (metadata is added afterwards).
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()
    assert digest == card["graph_sha256"]

    meta = {p.key: p.value for p in model.metadata_props}
    config = json.loads((checkpoint / "meta.json").read_text())["config"]
    assert meta["backbone"] == name and int(meta["embedding_size"]) == embedding_size
    assert json.loads(meta["input_size"]) == [112, 112] and meta["color_order"] == "RGB"
    assert float(meta["mean"]) == 127.5 and float(meta["std"]) == 127.5 and meta["layout"] == "NCHW"
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    assert meta["config_sha256"] == hashlib.sha256(canonical).hexdigest() == card["config_sha256"]
    assert meta["project_version"] == arcface.__version__ and meta["checkpoint_step"] == "123"
    assert json.loads(meta["parity"])["passed"] is True
    assert card["size_bytes"] > 0 and card["parameters"] == sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)

    if name in DEEP:
        return  # the digest above ties the file to the checked graph; spare CI another deep forward
    # Independent parity on the written file (after metadata was added), at another batch size: the
    # checkpoint rebuilt by load_backbone vs onnxruntime.
    batch = 2
    reference_model, _ = load_backbone(checkpoint)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    inputs = np.random.default_rng(7).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
    got = session.run(None, {"input": inputs})[0]
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(inputs)).numpy()
    assert got.shape == (batch, embedding_size) and np.isfinite(got).all()
    assert cosine_rows(got, expected).min() >= 0.99999
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# ---- the BN folding pass, against onnxruntime running the unfolded graph ---------------------------

def _tensor(rng, name, *shape, positive=False):
    values = rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0, 0.5, shape)
    return numpy_helper.from_array(values.astype(np.float32), name)


def _bn_inputs(rng, prefix, channels):
    return [_tensor(rng, f"{prefix}.g", channels, positive=True), _tensor(rng, f"{prefix}.b", channels),
            _tensor(rng, f"{prefix}.m", channels), _tensor(rng, f"{prefix}.v", channels, positive=True)]


def folding_graph(training_mode: int = 0) -> onnx.ModelProto:
    """Every BN placement the pass handles: after a single-use Conv, before a padded Conv on a tensor
    that is also used elsewhere (residual), before Flatten -> Gemm, after Gemm, after a 2-D MatMul; one
    BN parameter read through an Identity alias."""
    rng = np.random.default_rng(0)
    inits = [_tensor(rng, "wa", 4, 3, 3, 3), _tensor(rng, "ba", 4), _tensor(rng, "wb", 4, 4, 3, 3),
             _tensor(rng, "wg", 5, 4 * 8 * 8), _tensor(rng, "cg", 5), _tensor(rng, "wm", 4 * 8 * 8, 5)]
    for prefix, channels in (("bna", 4), ("bnb", 4), ("bnc", 4), ("bnd", 5), ("bne", 5)):
        inits += _bn_inputs(rng, prefix, channels)

    def bn(x: str, prefix: str, y: str) -> onnx.NodeProto:
        inputs = [x] + [f"{prefix}.{p}" for p in "gbmv"]
        return helper.make_node("BatchNormalization", inputs, [y], name=prefix.replace("bn", "bn_"))

    nodes = [
        helper.make_node("Identity", ["bna.g"], ["bna.g.alias"], name="alias"),
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("BatchNormalization", ["ca", "bna.g.alias", "bna.b", "bna.m", "bna.v"], ["t1"],
                         name="bn_a", epsilon=1e-3, training_mode=training_mode),
        bn("t1", "bnb", "nb"),
        helper.make_node("Conv", ["nb", "wb"], ["t2"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Add", ["t2", "t1"], ["t3"], name="residual"),
        bn("t3", "bnc", "nc"),
        helper.make_node("Flatten", ["nc"], ["f"], axis=1, name="flatten_c"),
        helper.make_node("Gemm", ["f", "wg", "cg"], ["g"], transB=1, name="fc"),
        bn("g", "bnd", "y1"),
        helper.make_node("Flatten", ["t3"], ["f2"], axis=1, name="flatten_e"),
        helper.make_node("MatMul", ["f2", "wm"], ["mm"], name="matmul"),
        bn("mm", "bne", "y2"),
        helper.make_node("Add", ["y1", "y2"], ["embedding"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, "folding", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fold_batchnorm_matches_onnxruntime_batchnorm():
    original = folding_graph()
    folded = folding_graph()
    stats = export.fold_batchnorm(folded)
    onnx.checker.check_model(folded, full_check=True)
    assert stats.to_dict() == {"into_conv": 1, "into_gemm": 2, "into_following_gemm": 1, "as_scale_shift": 1,
                               "constant_identities_removed": 1}
    ops = [node.op_type for node in folded.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops and "MatMul" not in ops
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    expected, got = _run(original, x), _run(folded, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Unused original BN/conv parameters are gone: no dead weight in the deployed file.
    used = {name for node in folded.graph.node for name in node.input}
    assert {t.name for t in folded.graph.initializer} <= used


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match="bn_a.*training mode"):
        export.fold_batchnorm(folding_graph(training_mode=1))


# ---- the contract checker and the InsightFace normalisation rule ------------------------------------

def contract_graph(first_names=("conv",), batch="batch", weight_type=np.float32, outputs=1):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(weight_type), "w")
    fc = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name=first_names[0])]
    if weight_type != np.float32:
        nodes = [helper.make_node("Cast", ["input"], ["input16"], to=TensorProto.FLOAT16, name="cast"),
                 helper.make_node("Conv", ["input16", "w"], ["c16"], name=first_names[0]),
                 helper.make_node("Cast", ["c16"], ["c"], to=TensorProto.FLOAT, name="cast_back")]
    nodes += [helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc"], ["embedding"], transB=1, name="fc")]
    outs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 8])]
    if outputs == 2:
        outs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [batch, 4, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          [batch, 3, 112, 112])],
                              outs, [weight, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_check_contract_accepts_a_deployable_graph_and_names_each_violation():
    assert export.check_contract(contract_graph(), 8) == []
    assert any("symbolic" in p for p in export.check_contract(contract_graph(batch=1), 8))
    assert any("fp32" in p for p in export.check_contract(contract_graph(weight_type=np.float16), 8))
    assert any("one output" in p for p in export.check_contract(contract_graph(outputs=2), 8))
    assert any("[batch, 16]" in p for p in export.check_contract(contract_graph(), 16))
    normalising = contract_graph()
    normalising.graph.node.insert(0, helper.make_node("Mul", ["input", "s"], ["input_scaled"], name="Mul_1"))
    normalising.graph.node.insert(0, helper.make_node("Sub", ["input", "m"], ["input_centred"], name="Sub_0"))
    problems = export.check_contract(normalising, 8)
    assert any("first node is Sub" in p for p in problems)
    assert any("InsightFace" in p for p in problems)


def test_insightface_rule_reads_the_first_eight_node_names():
    model = contract_graph()
    assert export.insightface_normalisation(model) == (127.5, 127.5)
    model.graph.node.insert(0, helper.make_node("Identity", ["input"], ["a"], name="_minus0"))
    assert export.insightface_normalisation(model) == (127.5, 127.5)  # needs both a Sub and a Mul name
    model.graph.node.insert(1, helper.make_node("Identity", ["a"], ["b"], name="_mul0"))
    assert export.insightface_normalisation(model) == (0.0, 1.0)
    late = contract_graph()
    for i in range(8):
        late.graph.node.insert(0, helper.make_node("Identity", ["input"], [f"i{i}"], name=f"pad{i}"))
    late.graph.node.append(helper.make_node("Identity", ["input"], ["s"], name="Sub_late"))
    late.graph.node.append(helper.make_node("Identity", ["input"], ["m"], name="Mul_late"))
    assert export.insightface_normalisation(late) == (127.5, 127.5)


# ---- CLI, model card, InsightFace-style consumption --------------------------------------------------

def _pack(path: Path, pairs: int = 12) -> Path:
    from recordio_tools.synth import render_identity_image
    from recordio_tools.verification_bin import write_bin

    bins, issame = [], []
    for i in range(pairs):
        same = i % 2 == 0
        first = render_identity_image(100 + i, 0, seed=3)
        second = render_identity_image(100 + i if same else 200 + i, 1, seed=3)
        bins += [cv2.imencode(".png", first)[1].tobytes(), cv2.imencode(".png", second)[1].tobytes()]
        issame.append(same)
    return write_bin(path, bins, issame)


def test_cli_exports_with_card_latency_and_insightface_style_input(tiny, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path, tiny, 32)
    pack = _pack(tmp_path / "synthpairs.bin")
    out = tmp_path / "deploy"
    code = export.main(["--model", str(checkpoint), "-o", str(out), "--parity-batch-sizes", "1,4",
                        "--latency-runs", "1", "--latency-batch-sizes", "1,2", "--eval-pack", str(pack),
                        "--eval-batch-size", "5", "-q"])
    assert code == 0, capsys.readouterr().err
    card = json.loads((out / "model.json").read_text())
    assert [r["batch"] for r in card["latency"]["rows"]] == [1, 2]
    assert all(r["onnxruntime_ms"] > 0 and r["pytorch_ms"] > 0 for r in card["latency"]["rows"])
    assert card["input"]["color_order"] == "RGB"
    assert card["insightface_loader_normalisation"] == [127.5, 127.5]

    # What InsightFace's loader feeds: BGR images through cv2.dnn.blobFromImages(1/std, mean, swapRB).
    from eval.verification import load_pack

    loaded = load_pack(pack)
    bgr = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in loaded.bins]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    blob = cv2.dnn.blobFromImages(bgr, 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    single = session.run(None, {session.get_inputs()[0].name: blob})[0]
    mirrored_blob = cv2.dnn.blobFromImages([b[:, ::-1] for b in bgr], 1.0 / 127.5, (112, 112),
                                           (127.5, 127.5, 127.5), swapRB=True)
    mirrored = session.run(None, {"input": mirrored_blob})[0]
    # What benchmark validators do: a batch of 32 must run and stay finite.
    assert np.isfinite(session.run(None, {"input": np.concatenate([blob, blob[:8]])})[0]).all()
    from eval.embedder import OnnxEmbedder

    ours = OnnxEmbedder(out / "model.onnx", flip=False).embed_images(
        np.stack([preprocess.decode_rgb(data) for data in loaded.bins]))
    assert cosine_rows(ours, single).min() >= 0.99999  # same input contract as the loader's

    # Model card thresholds, recomputed by brute force from those scores.
    mc = card["model_card"]
    assert mc["pack"] == "synthpairs" and mc["num_pairs"] == 12 and mc["num_impostor_pairs"] == 6
    assert 0.0 <= mc["accuracy_mean"] <= 1.0
    for style, embeddings in (("single", single), ("flip_sum", single + mirrored)):
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        scores = (unit[0::2] * unit[1::2]).sum(1)
        issame = np.asarray(loaded.issame)
        impostor, genuine = scores[~issame], scores[issame]
        points = mc["operating_points"][style]
        assert [p["far_target"] for p in points] == [1e-3, 1e-4, 1e-5]
        for point in points:
            # 6 impostor pairs: no target below 1/6 is measurable, so no impostor may be accepted.
            assert point["resolvable"] is False and point["far"] == 0.0
            assert point["threshold"] > impostor.max() - 1e-6
            assert point["threshold"] <= np.nextafter(impostor.max(), np.inf) + 1e-6
            assert point["tar"] == pytest.approx((genuine >= point["threshold"] - 1e-6).mean())
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["model_card"])["pack"] == "synthpairs"


def test_existing_output_refused_unless_overwrite(tiny, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path, tiny, 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the user's model")
    args = ["--model", str(checkpoint), "-o", str(out), "--parity-batch-sizes", "1", "--latency-runs", "0",
            "-q"]
    assert export.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == b"the user's model"
    assert export.main(args + ["--overwrite", "--no-check"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["parity"] == {"skipped": True, "passed": None}
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def _edit_meta(checkpoint: Path, edit) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    edit(meta)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case, message", [
    ("version", "format version 99 is not supported"),
    ("no_config", "config.backbone.name"),
    ("corrupted", "cannot load backbone weights"),
    ("missing", "no such checkpoint"),
    ("preprocess", "preprocess.mean"),
])
def test_bad_checkpoints_fail_clearly(tiny, tmp_path, capsys, case, message):
    checkpoint = make_checkpoint(tmp_path, tiny, 16)
    if case == "version":
        _edit_meta(checkpoint, lambda m: m.update(format_version=99))
    elif case == "no_config":
        _edit_meta(checkpoint, lambda m: m.pop("config"))
    elif case == "corrupted":
        data = (checkpoint / "backbone.pt").read_bytes()
        (checkpoint / "backbone.pt").write_bytes(data[: len(data) // 2])
    elif case == "missing":
        checkpoint = tmp_path / "nowhere"
    else:
        _edit_meta(checkpoint, lambda m: m["preprocess"].update(mean=0.0))
    out = tmp_path / "out"
    assert export.main(["--model", str(checkpoint), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "model.onnx").exists()


class _Unexportable(nn.Module):
    """An op the TorchScript exporter has no ONNX symbolic for."""

    def __init__(self, embedding_size: int = 3, **_: object) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.flatten(2)) * self.scale


class _DriftsInExport(nn.Module):
    """Computes something slightly different while being exported: a stand-in for an exporter bug that
    only the parity check can catch."""

    def __init__(self, embedding_size: int = 8, **_: object) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.fc = nn.Linear(3, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.mean(dim=(2, 3)))
        if torch.onnx.is_in_onnx_export():
            out = out * 1.01
        return out


def _checkpoint_for(tmp_path: Path, monkeypatch, name: str, factory, embedding_size: int) -> Path:
    monkeypatch.setitem(backbones._REGISTRY, name, factory)
    config = {"backbone": {"name": name, "embedding_size": embedding_size, "dropout": 0.0}}
    return save_backbone_checkpoint(tmp_path / name, factory(embedding_size=embedding_size), config)


def test_export_failure_is_clear_and_leaves_no_model(tmp_path, monkeypatch, capsys):
    checkpoint = _checkpoint_for(tmp_path, monkeypatch, "unexportable", _Unexportable, 3)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert export.main(["--model", str(checkpoint), "-o", str(out), "-q"]) == 1  # fails while running
    err = capsys.readouterr().err
    assert "torchscript exporter failed" in err and "svdvals" in err
    assert not (out / "model.onnx").exists() and not (out / "model.json").exists()


def test_parity_failure_exits_nonzero_and_keeps_rejected_graph_only_on_request(tmp_path, monkeypatch, capsys):
    checkpoint = _checkpoint_for(tmp_path, monkeypatch, "drifting", _DriftsInExport, 8)
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "-o", str(out), "--parity-batch-sizes", "1,4", "--latency-runs", "0",
            "-q"]
    assert export.main(args) == 1
    err = capsys.readouterr().err
    assert "parity check FAILED" in err and "random_b4" in err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    assert export.main(args + ["--keep-failed"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["model.rejected.onnx"]


def test_fp16_and_int8_variants_have_their_own_parity(tiny, tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path, tiny, 16)
    options = export.ExportOptions(fp16=True, int8=True, parity_batch_sizes=(1, 2), latency_runs=0,
                                   progress=False)
    result = export.export_checkpoint(checkpoint, tmp_path / "out", options)
    fp16 = onnx.load(str(tmp_path / "out" / export.FP16_FILE))
    assert {t.data_type for t in fp16.graph.initializer if t.data_type != TensorProto.INT64} == {
        TensorProto.FLOAT16}
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # fp32 I/O kept
    for kind in ("fp16", "int8_dynamic"):
        report = result.card["variants"][kind]["parity"]
        min_cos, max_rel = export.VARIANT_TOLERANCES[kind]
        assert report["tolerances"]["min_cosine"] == min_cos
        assert report["passed"] == all(r["min_cosine"] >= min_cos and r["max_abs_diff_rel"] <= max_rel
                                       for r in report["sets"])
    # Reduced precision really differs from fp32 (the variant is not a copy of the fp32 graph) ...
    assert max(r["max_abs_diff"] for r in result.card["variants"]["fp16"]["parity"]["sets"]) > 0
    # ... and a variant beyond its tolerance is reported, not written, while the fp32 model stands.
    monkeypatch.setitem(export.VARIANT_TOLERANCES, "fp16", (1.0 + 1e-9, 0.0))
    result = export.export_checkpoint(checkpoint, tmp_path / "out2",
                                      export.ExportOptions(fp16=True, parity_batch_sizes=(1,), latency_runs=0,
                                                           progress=False))
    assert result.failed_variants == ["fp16"] and not (tmp_path / "out2" / export.FP16_FILE).exists()
    assert result.onnx_path.is_file() and result.card["variants"]["fp16"]["file"] is None


@pytest.mark.slow
def test_dynamo_exporter_meets_the_same_contract():
    from backbones.mobilefacenet import MobileFaceNet

    torch.manual_seed(0)
    model = calibrated(MobileFaceNet(embedding_size=16, blocks=(1, 1, 1, 1), width=1))
    proto, stats = export.export_model(model, exporter="dynamo")
    assert_contract(proto, 16)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    inputs = export.parity_inputs((1, 3))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    report = export.parity_report(model, lambda x: session.run(None, {"input": x})[0], inputs)
    assert report["passed"], export.format_parity(report)


def test_parity_inputs_are_fixed_faces_and_noise():
    first, second = export.parity_inputs((1, 4), seed=0), export.parity_inputs((4, 1), seed=0)
    assert list(first) == ["faces_b1", "random_b1", "faces_b4", "random_b4"]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        assert first[key].dtype == np.float32 and first[key].shape[1:] == (3, 112, 112)
        assert first[key].min() >= -1.0 and first[key].max() <= 1.0
    np.testing.assert_array_equal(first["faces_b1"], first["faces_b4"][:1])
    assert len({first["faces_b4"][i].tobytes() for i in range(4)}) == 4
    # Faces go through the project's preprocessing: uint8 levels map to (p - 127.5) / 127.5 exactly.
    pixels = first["faces_b4"] * preprocess.STD + preprocess.MEAN
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)


def test_options_validate_with_the_key_named():
    with pytest.raises(ValueError, match="exporter"):
        export.ExportOptions(exporter="tflite")
    with pytest.raises(ValueError, match="opset"):
        export.ExportOptions(opset=13)
    with pytest.raises(ValueError, match="parity_batch_sizes"):
        export.ExportOptions(parity_batch_sizes=(0,))
    with pytest.raises(SystemExit):
        export.main(["--model", "ckpt", "-o", "out", "--parity-batch-sizes", "a,b"])


def test_parity_report_applies_both_tolerances():
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :8] * 10.0

    model = Fixed()
    inputs = {"set": np.random.default_rng(0).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)}
    exact = model(torch.from_numpy(inputs["set"])).numpy()

    def report(transform):
        return export.parity_report(model, lambda x: transform(exact.copy()), inputs)

    same = report(lambda e: e)
    assert same["passed"] and same["sets"][0]["max_abs_diff"] == 0.0
    scale = float(np.abs(exact).max())
    # Cosine stays 1 under a uniform scale, but the relative difference 2e-4 exceeds 1e-4.
    scaled = report(lambda e: e * (1 + 2e-4))
    assert not scaled["passed"] and scaled["sets"][0]["min_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert scaled["sets"][0]["max_abs_diff_rel"] == pytest.approx(2e-4, rel=1e-3)
    # A within-tolerance perturbation passes.
    assert report(lambda e: e + 0.5e-4 * scale)["passed"]

    # One embedding pointing elsewhere: cosine below 0.99999 fails even though the others match.
    def rotate(e):
        e[1] = np.roll(e[1], 1)
        return e
    rotated = report(rotate)
    assert not rotated["passed"] and rotated["sets"][0]["min_cosine"] < 0.99999
    non_finite = report(lambda e: np.where(np.arange(e.size).reshape(e.shape) == 5, np.nan, e))
    assert not non_finite["passed"] and non_finite["sets"][0]["finite"] is False
