"""cosine_logits: value and both gradients equal the composed autograd reference
``F.linear(F.normalize(e), F.normalize(w[rows]))`` in float64, in both gradient layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arcface.head.cosine_logits import cosine_logits

BATCH, CLASSES, DIM = 6, 13, 9


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(BATCH, DIM, dtype=torch.float64, generator=generator)
    weight = torch.randn(CLASSES, DIM, dtype=torch.float64, generator=generator)
    grad_out = torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=generator)
    return embeddings, weight, grad_out


def _reference(embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
               grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e = embeddings.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = F.linear(F.normalize(e), F.normalize(w if rows is None else w[rows]))
    out.backward(grad_out)
    return out.detach(), e.grad, w.grad


def _ours(embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None, grad_out: torch.Tensor,
          layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e = embeddings.clone().requires_grad_()
    w = torch.nn.Parameter(weight.clone())
    out = cosine_logits(e, w, rows, layout)
    value = out.detach().clone()
    out.backward(grad_out)
    return value, e.grad, w.grad


@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize("rows", [None, torch.tensor([0, 2, 3, 7, 12]), torch.tensor([5])])
def test_equals_composed_autograd(layout: str, rows: torch.Tensor | None) -> None:
    embeddings, weight, grad_out = _inputs(0)
    grad_out = grad_out if rows is None else grad_out[:, :rows.numel()]
    ref_value, ref_grad_e, ref_grad_w = _reference(embeddings, weight, rows, grad_out)
    value, grad_e, grad_w = _ours(embeddings, weight, rows, grad_out, layout)
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_e, ref_grad_e, rtol=0, atol=1e-13)
    sparse = layout == "sparse" and rows is not None
    assert grad_w.is_sparse == sparse
    if sparse:  # only the sampled rows are stored, nothing else
        assert torch.equal(grad_w._indices()[0], rows)
    torch.testing.assert_close(grad_w.to_dense(), ref_grad_w, rtol=0, atol=1e-13)


def test_clamped_zero_rows_match_autograd_through_the_clamp() -> None:
    embeddings, weight, grad_out = _inputs(1)
    embeddings[2] = 0.0
    weight[4] = 0.0
    ref_value, ref_grad_e, ref_grad_w = _reference(embeddings, weight, None, grad_out)
    value, grad_e, grad_w = _ours(embeddings, weight, None, grad_out, "dense")
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_e, ref_grad_e, rtol=0, atol=1e-2)  # entries are O(1e12) there
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-12, atol=1e-13)
    assert bool(grad_w[4].abs().sum() > 0)


def test_float32_matches_float64_reference() -> None:
    embeddings, weight, grad_out = _inputs(2)
    rows = torch.tensor([1, 4, 6, 10])
    ref_value, ref_grad_e, ref_grad_w = _reference(embeddings, weight, rows, grad_out[:, :4])
    value, grad_e, grad_w = _ours(embeddings.float(), weight.float(), rows, grad_out[:, :4].float(), "sparse")
    torch.testing.assert_close(value.double(), ref_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_e.double(), ref_grad_e, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_w.to_dense().double(), ref_grad_w, rtol=0, atol=1e-5)


def test_second_backward_is_refused_and_bad_arguments_raise() -> None:
    embeddings, weight, _ = _inputs(3)
    out = cosine_logits(embeddings.requires_grad_(), torch.nn.Parameter(weight))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.sum().backward()
    with pytest.raises(ValueError, match="grad_layout"):
        cosine_logits(embeddings, weight, None, "coo")
    with pytest.raises(ValueError, match="dtype"):
        cosine_logits(embeddings.float(), weight)
