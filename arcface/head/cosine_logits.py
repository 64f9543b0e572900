"""Cosine logits between embeddings and (a subset of) class centres, with a hand-written backward.

``cosine_logits(embeddings, weight, rows)`` is ``F.linear(F.normalize(embeddings),
F.normalize(weight[rows]))`` (``rows=None``: every row), mathematically and in its gradient. It exists
because the composed version is the sharded classifier's main cost after the matrix products: autograd
materialises several ``[k, D]`` temporaries for ``normalize``'s backward (division, negation, norm
gradient), each a fresh allocation of hundreds of MB at a million classes. Here the sampled rows are
gathered once, normalised in place, and that same buffer becomes the weight gradient:

* forward: ``unit_w = weight[rows] / |weight[rows]|`` (one gather, one in-place division);
  ``cos_theta = unit_e @ unit_w.T``;
* backward, with ``g = dL/dcos_theta`` ``[B, k]``::

      dL/de = (g @ unit_w - <g @ unit_w, unit_e> unit_e) / |e|                      (small, B x D)
      dL/dw = (g.T @ unit_e - c * unit_w) / |w|,   c_j = sum_b g_bj cos_theta_bj     (in unit_w)

  computed as ``unit_w *= -c; unit_w += g.T @ unit_e`` (one ``addmm_``); ``unit_w /= |w|``.

The weight gradient comes back in the layout the update needs: ``"sparse"`` a coalesced COO tensor
holding only the sampled rows (what ``F.embedding(..., sparse=True)`` would give), ``"dense"`` a full
``[N, D]`` tensor with zeros outside ``rows``. Like ``F.normalize``, norms are clamped at ``eps``; a
clamped row's gradient is ``g / eps`` without the projection term (what autograd gives through the
clamp). The gathered rows are consumed by the backward (they become the gradient), so a second
backward through the same graph (after ``retain_graph=True``) raises instead of returning garbage.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["cosine_logits"]

_EPS = 1e-12
# Elements of g * cos_theta formed at a time when computing c (a few MB, reused across chunks).
_CHUNK_ELEMENTS = 1 << 21


class _CosineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, embeddings: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor | None, grad_layout: str) -> torch.Tensor:
        emb_norm = embeddings.norm(dim=1, keepdim=True).clamp_min_(_EPS)
        unit_emb = embeddings / emb_norm
        unit_w = weight.detach().index_select(0, rows) if rows is not None else weight.detach().clone()
        w_norm = unit_w.norm(dim=1, keepdim=True).clamp_min_(_EPS)
        unit_w.div_(w_norm)
        cos_theta = torch.mm(unit_emb, unit_w.t())
        ctx.save_for_backward(unit_emb, emb_norm, unit_w, w_norm, cos_theta, rows)
        ctx.grad_layout = grad_layout
        ctx.weight_shape = weight.shape
        ctx.consumed = False
        return cos_theta

    @staticmethod
    def backward(ctx: Any, grad_cos: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("cosine_logits reuses its saved buffers for the gradient: backward can run "
                               "only once per forward (retain_graph=True is not supported)")
        ctx.consumed = True
        unit_emb, emb_norm, unit_w, w_norm, cos_theta, rows = ctx.saved_tensors
        grad_cos = grad_cos.contiguous()
        grad_emb = None
        if ctx.needs_input_grad[0]:
            grad_unit_emb = torch.mm(grad_cos, unit_w)
            radial = (grad_unit_emb * unit_emb).sum(dim=1, keepdim=True)
            radial.masked_fill_(emb_norm <= _EPS, 0.0)
            grad_emb = grad_unit_emb.sub_(unit_emb * radial).div_(emb_norm)
        if not ctx.needs_input_grad[1]:
            return grad_emb, None, None, None
        # c_j = sum_b g_bj cos_bj, reduced over row chunks through one small reused buffer (a [B, k]
        # temporary would be hundreds of MB at a million classes).
        radial_w = torch.zeros(unit_w.shape[0], dtype=unit_w.dtype, device=unit_w.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, grad_cos.shape[1]))
        product = grad_cos.new_empty(min(chunk, grad_cos.shape[0]), grad_cos.shape[1])
        for start in range(0, grad_cos.shape[0], chunk):
            rows_here = min(chunk, grad_cos.shape[0] - start)
            torch.mul(grad_cos[start:start + rows_here], cos_theta[start:start + rows_here],
                      out=product[:rows_here])
            radial_w += product[:rows_here].sum(dim=0)
        radial_w.masked_fill_(w_norm.squeeze(1) <= _EPS, 0.0)
        grad_rows = unit_w.mul_(radial_w.neg_().unsqueeze(1))
        grad_rows.addmm_(grad_cos.t(), unit_emb).div_(w_norm)
        return grad_emb, weight_gradient(grad_rows, rows, ctx.grad_layout, ctx.weight_shape), None, None


def weight_gradient(grad_rows: torch.Tensor, rows: torch.Tensor | None, layout: str,
                    weight_shape: torch.Size) -> torch.Tensor:
    """The gradient of the whole shard ``weight_shape`` from the gradient of its sampled ``rows``
    (sorted, unique; None = every row): a sparse COO tensor of those rows (``layout = "sparse"``, for
    the row optimisers) or a dense tensor that is zero elsewhere."""
    if rows is None:
        return grad_rows
    if layout == "sparse":
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, weight_shape, is_coalesced=True,
                                       check_invariants=False)
    return grad_rows.new_zeros(weight_shape).index_copy_(0, rows, grad_rows)


def cosine_logits(embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None = None,
                  grad_layout: str = "dense") -> torch.Tensor:
    """``normalize(embeddings) @ normalize(weight[rows]).T`` ``[B, k]`` (module docstring).

    ``rows``: sorted, unique row indices (``None``: all rows); ``grad_layout``: ``"sparse"`` (COO
    gradient of the sampled rows) or ``"dense"`` for ``weight``'s gradient.
    """
    if grad_layout not in ("sparse", "dense"):
        raise ValueError(f"grad_layout must be 'sparse' or 'dense', got {grad_layout!r}")
    if embeddings.dtype != weight.dtype:
        raise ValueError(f"embeddings ({embeddings.dtype}) and weight ({weight.dtype}) must share a dtype")
    return _CosineLogits.apply(embeddings, weight, rows, grad_layout)
