"""Backbone registry and networks: shapes, gradients, reference sizes, checkpointing, precision,
memory format, compile and ONNX export with a dynamic batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from backbones import canonical_name, create_backbone, list_backbones

# FORMATS.md section 8: parameters at 512-d, in millions (two decimals: "to the thousand" below).
REFERENCE_PARAMS_M = {"r18": 24.03, "r34": 34.14, "r50": 43.59, "r100": 65.16, "r200": 118.83,
                      "mobilefacenet": 2.06,
                      # not in FORMATS.md: arcface_torch's mbf_large, counted from its layer list
                      # (test_insightface_backbones.py::arcface_torch_mbf_shapes gives 6.31488 M)
                      "mobilefacenet_large": 6.31,
                      # not in FORMATS.md: the half-width CPU variant; guards the registry entry's width
                      "mobilefacenet_s": 0.78}
SLOW_EXPORTS = {"r100", "r200"}


def _small(name: str, **kwargs) -> tuple[nn.Module, int]:
    """A backbone at a reduced input size (IResNet accepts any multiple of 16) to keep CPU tests quick;
    MobileFaceNet's GDC head needs the full 112x112."""
    if name.startswith("mobilefacenet"):
        return create_backbone(name, **kwargs), 112
    return create_backbone(name, input_size=32, **kwargs), 32


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names_and_aliases():
    assert set(list_backbones()) == set(REFERENCE_PARAMS_M)
    assert canonical_name("LResNet100E-IR") == "r100"
    assert canonical_name("lresnet100e-ir") == "r100"
    assert canonical_name("iresnet50") == "r50"
    assert canonical_name("MBF") == "mobilefacenet"
    with pytest.raises(ValueError, match=r"unknown backbone 'r101'.*mobilefacenet.*r100"):
        create_backbone("r101")
    with pytest.raises(ValueError, match="embedding_size"):
        create_backbone("r18", embedding_size=0)
    with pytest.raises(ValueError, match="dropout"):
        create_backbone("r18", dropout=1.0)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS_M))
def test_parameter_counts_match_reference(name):
    millions = _count(create_backbone(name, embedding_size=512)) / 1e6
    assert abs(millions - REFERENCE_PARAMS_M[name]) < 0.005 + 1e-9, millions
    # The count scales with the embedding size exactly as the E head's FC + BN1d say it must.
    if name == "r18":
        d128 = _count(create_backbone(name, embedding_size=128))
        assert _count(create_backbone(name, embedding_size=512)) - d128 == (512 - 128) * (512 * 49 + 1 + 2)


@pytest.mark.parametrize("name", list_backbones())
def test_forward_backward_and_checkpointing(name):
    """Shape, finiteness, a gradient for every trainable parameter; gradient checkpointing gives the
    same output, gradients and BN running statistics as the plain network."""
    torch.manual_seed(0)
    plain, size = _small(name, embedding_size=24, dropout=0.0)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    x = torch.randn(3, 3, size, size)

    out_plain = plain(x)
    out_plain.square().sum().backward()
    out_ckpt = ckpt(x)
    out_ckpt.square().sum().backward()

    assert out_plain.shape == (3, 24)
    assert torch.isfinite(out_plain).all()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for (pname, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if not p.requires_grad:
            assert pname.endswith("features.weight")  # the E head's BN1d scale, fixed at 1 by design
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} received a zero gradient"
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    for (bname, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=f"buffer {bname} differs")


def test_checkpointing_inactive_in_eval_and_no_grad():
    torch.manual_seed(0)
    model, size = _small("r18", embedding_size=8, gradient_checkpointing=True)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a = model(x)
    model.gradient_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), a, rtol=0, atol=0)


def test_dropout_configurable_and_only_in_training():
    model, size = _small("r18", embedding_size=8, dropout=0.4)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.4 for m in model.modules())
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_tiny_input(dtype):
    # Reduced-precision convolutions are ~100x slower on this CPU: the smallest legal input only.
    torch.manual_seed(0)
    # Training mode (batch statistics), as the trainer runs it: a fresh network's running statistics
    # are identity, so its eval-mode activations grow far beyond fp16 range until it has trained.
    model = create_backbone("r18", embedding_size=8, input_size=16).train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    assert torch.isfinite(low).all()
    # Relative agreement of the embedding direction, which is what the loss and evaluation use.
    cos = nn.functional.cosine_similarity(low.float(), ref, dim=1)
    assert (cos > 0.98).all(), cos


def test_autocast_bf16_mobilefacenet_training_step():
    torch.manual_seed(0)
    model = create_backbone("mobilefacenet", embedding_size=8)
    x = torch.randn(2, 3, 112, 112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["r18", "mobilefacenet"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model, size = _small(name, embedding_size=16)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, size, size)
    ref = model(x)  # training mode: batch statistics, the regime channels_last is used for
    out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ref.sum().backward()
    out.sum().backward()
    for p, q in zip(model.parameters(), model_cl.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_small_model():
    torch.manual_seed(0)
    # aot_eager traces the whole forward and backward through dynamo + AOTAutograd (where graph breaks
    # and unsupported ops show up) without inductor's C++ build, which alone takes ~45 s on 2 cores.
    model = create_backbone("r18", embedding_size=8, input_size=16, gradient_checkpointing=True)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    ref.square().sum().backward()
    out = torch.compile(twin, backend="aot_eager", fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5)
    for (bname, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=f"buffer {bname} differs")


def _export_and_run(name: str, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model, size = _small(name, embedding_size=16)
    with torch.no_grad():  # non-trivial BN statistics so the exported eval graph is really checked
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, size, size), path, input_names=["input"],
                      output_names=["embedding"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((4, 3, size, size)).astype(np.float32)
    (got,) = session.run(["embedding"], {"input": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (4, 16)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in SLOW_EXPORTS])
def test_onnx_export_batch1_runs_at_batch4(name, tmp_path):
    _export_and_run(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_EXPORTS))
def test_onnx_export_batch1_runs_at_batch4_deep(name, tmp_path):
    _export_and_run(name, tmp_path)
