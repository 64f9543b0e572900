"""L-Softmax (large-margin softmax, Liu et al. 2016) as a head of the sharded Partial FC classifier.

L-Softmax keeps the plain softmax's *unnormalised* logits ``W_j . x = |W_j| |x| cos(theta_j)`` and puts
an integer multiplicative angular margin ``m`` on the target class only::

    target = (lambda * W_y.x + |W_y| |x| psi(theta_y)) / (1 + lambda)        others = W_j . x
    psi(theta) = (-1)^k cos(m theta) - 2k   for theta in [k pi/m, (k+1) pi/m],  k = 0 .. m-1

``psi`` equals ``cos(m theta)`` near 0 and is monotone decreasing and continuously differentiable on
``[0, pi]``. ``m = 1`` is the plain softmax of DeepFace / DeepID / the center-loss paper (``psi = cos``,
the target logit is ``W_y . x``). ``lambda`` blends in the plain target logit: the published recipe
starts with a large lambda (the full margin is too hard at initialisation) and anneals it,
``lambda_t = max(base * (1 + gamma * t) ** -power, lambda_min)`` with ``t`` the number of training
forwards so far.

Why it fits the sharded classifier exactly: every non-target logit is the plain product of one FC row
and the embedding, and the target logit needs only the target row, the embedding and their norms. The
target row lives on one rank and Partial FC sampling always keeps the positives, so each rank computes
its columns exactly (sampled or not) and the distributed softmax does the rest, as for the cosine
margins. What does not carry over from the cosine heads: there is no logit scale (the norms play its
part) and no inter-class filtering (it thresholds cosines).

The logits and their gradient are computed in closed form (one custom autograd function, the same
gradient layouts as :func:`arcface.head.cosine_logits.cosine_logits`). With ``cos(m theta) = T_m(c)`` (the
Chebyshev polynomial, ``c = cos theta = z / (a b)``, ``z = W_y . x``, ``a = |W_y|``, ``b = |x|``) and
``psi'(c) = (-1)^k m U_{m-1}(c)``, the target logit's gradient is::

    d target / d x = ((lambda + psi') W_y + (psi - c psi') (a / b) x) / (1 + lambda)
    d target / d W_y = ((lambda + psi') x + (psi - c psi') (b / a) W_y) / (1 + lambda)

finite everywhere (no ``1 / sin(theta)`` of an ``acos`` derivative). The non-target columns are a plain
matrix product each way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from arcface.head.cosine_logits import weight_gradient

__all__ = ["LSoftmaxHead", "lsoftmax_logits", "lsoftmax_lambda", "chebyshev_psi"]

_EPS = 1e-12


def chebyshev_psi(cos_theta: torch.Tensor, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(psi, d psi / d cos)`` of L-Softmax at cosines ``cos_theta`` for the integer margin ``margin``.

    ``psi = (-1)^k T_m(c) - 2k`` with ``k = floor(m * acos(c) / pi)`` (clamped to ``0 .. m-1``), where
    ``T_m(cos theta) = cos(m theta)``; the derivative is ``(-1)^k m U_{m-1}(c)`` (Chebyshev polynomials of
    the first and second kind, by their recurrences).
    """
    c = cos_theta
    t_prev, t_cur = torch.ones_like(c), c            # T_0, T_1
    u_prev, u_cur = torch.zeros_like(c), torch.ones_like(c)  # U_{-1}, U_0
    for _ in range(margin - 1):
        t_prev, t_cur = t_cur, 2 * c * t_cur - t_prev
        u_prev, u_cur = u_cur, 2 * c * u_cur - u_prev
    # The piece: the number of boundaries cos(j pi / m), j = 1 .. m-1, at or above which c lies below.
    k = torch.zeros_like(c)
    for j in range(1, margin):
        k += (c <= math.cos(j * math.pi / margin)).to(c.dtype)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * t_cur - 2.0 * k, sign * margin * u_cur


def lsoftmax_lambda(iteration: int, base: float, gamma: float, power: float, lambda_min: float) -> float:
    """The annealed blend weight ``max(base * (1 + gamma * iteration) ** -power, lambda_min)``."""
    return max(base * (1.0 + gamma * iteration) ** (-power), lambda_min)


class _LSoftmaxLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, embeddings: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor | None, targets: torch.Tensor, margin: int, lam: float,
                grad_layout: str) -> torch.Tensor:
        w = weight.detach().index_select(0, rows) if rows is not None else weight.detach()
        x = embeddings.detach()
        logits = torch.mm(x, w.t())
        has_target = targets >= 0
        index = targets.clamp(min=0).unsqueeze(1)  # column 0 stands in for rows without a target here
        z = logits.gather(1, index).squeeze(1)
        a = w.index_select(0, index.squeeze(1)).norm(dim=1).clamp_min(_EPS)  # |W_y|
        b = x.norm(dim=1).clamp_min(_EPS)                                    # |x|
        c = (z / (a * b)).clamp(-1.0, 1.0)
        psi, dpsi = chebyshev_psi(c, margin)
        target = (lam * z + a * b * psi) / (1.0 + lam)
        logits.scatter_(1, index, torch.where(has_target, target, z).unsqueeze(1))
        ctx.save_for_backward(x, w, rows, index, has_target, a, b, c, psi, dpsi)
        ctx.lam = lam
        ctx.grad_layout = grad_layout
        ctx.weight_shape = weight.shape
        return logits

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, w, rows, index, has_target, a, b, c, psi, dpsi = ctx.saved_tensors
        lam = ctx.lam
        grad = grad_logits.contiguous().clone()
        # Target column: the bilinear part's slope is (lambda + psi') / (1 + lambda); the radial terms
        # (psi - c psi') (a/b) x and (b/a) W_y come from the norms (module docstring).
        column = grad.gather(1, index).squeeze(1)
        bilinear = torch.where(has_target, column * (lam + dpsi) / (1.0 + lam), column)
        grad.scatter_(1, index, bilinear.unsqueeze(1))
        radial = torch.where(has_target, column * (psi - c * dpsi) / (1.0 + lam), torch.zeros_like(column))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, w).add_((radial * a / b).unsqueeze(1) * x)
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None, None, None, None, None
        grad_rows = torch.mm(grad.t(), x)
        owned = has_target.nonzero().squeeze(1)
        target_rows = index.squeeze(1)[owned]
        grad_rows.index_add_(0, target_rows, (radial[owned] * b[owned] / a[owned]).unsqueeze(1)
                             * w.index_select(0, target_rows))
        grad_weight = weight_gradient(grad_rows, rows, ctx.grad_layout, ctx.weight_shape)
        return grad_x, grad_weight, None, None, None, None, None


def lsoftmax_logits(embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                    targets: torch.Tensor, margin: int, lam: float = 0.0,
                    grad_layout: str = "dense") -> torch.Tensor:
    """L-Softmax logits ``[B, k]`` of ``embeddings [B, D]`` against ``weight[rows]`` (module docstring).

    ``rows``: sorted unique row indices (``None``: all rows); ``targets [B]``: the column of each row's
    target among them, or ``-1`` where the target is not here (that row's logits are plain ``W x``);
    ``lam``: the blend weight lambda; ``grad_layout``: ``"sparse"`` (COO gradient of the sampled rows) or
    ``"dense"``.
    """
    if grad_layout not in ("sparse", "dense"):
        raise ValueError(f"grad_layout must be 'sparse' or 'dense', got {grad_layout!r}")
    if embeddings.dtype != weight.dtype:
        raise ValueError(f"embeddings ({embeddings.dtype}) and weight ({weight.dtype}) must share a dtype")
    if int(margin) != margin or margin < 1:
        raise ValueError(f"the L-Softmax margin must be an integer >= 1, got {margin}")
    if lam < 0:
        raise ValueError(f"the L-Softmax lambda must be >= 0, got {lam}")
    return _LSoftmaxLogits.apply(embeddings, weight, rows, targets, int(margin), float(lam), grad_layout)


class LSoftmaxHead(nn.Module):
    """L-Softmax head for :class:`arcface.head.partial_fc.PartialFC` (``computes_logits``: it receives the
    gathered embeddings and the weight shard instead of cosines).

    Args:
        margin: the integer multiplicative angular margin m (1 = plain softmax ``W x``).
        lambda_base, lambda_gamma, lambda_power, lambda_min: the annealing of lambda,
            ``max(base * (1 + gamma * t) ** -power, lambda_min)`` with ``t`` = the buffer ``iteration``
            (training-mode forwards so far; saved in checkpoints with the FC shard).
    """

    computes_logits = True

    def __init__(self, margin: int = 4, lambda_base: float = 1000.0, lambda_gamma: float = 0.12,
                 lambda_power: float = 1.0, lambda_min: float = 5.0) -> None:
        super().__init__()
        if int(margin) != margin or margin < 1:
            raise ValueError(f"loss.lsoftmax_margin must be an integer >= 1, got {margin}")
        for name, value in (("lambda_base", lambda_base), ("lambda_gamma", lambda_gamma),
                            ("lambda_power", lambda_power), ("lambda_min", lambda_min)):
            if not value >= 0:
                raise ValueError(f"loss.lsoftmax_{name} must be >= 0, got {value}")
        self.margin = int(margin)
        self.lambda_base, self.lambda_gamma = float(lambda_base), float(lambda_gamma)
        self.lambda_power, self.lambda_min = float(lambda_power), float(lambda_min)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, lambda=max({self.lambda_base} * (1 + {self.lambda_gamma} t) ** "
                f"-{self.lambda_power}, {self.lambda_min})")

    def current_lambda(self) -> float:
        """lambda at the current iteration (the value the next training forward uses)."""
        return lsoftmax_lambda(int(self.iteration), self.lambda_base, self.lambda_gamma, self.lambda_power,
                               self.lambda_min)

    def forward(self, embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                targets: torch.Tensor, grad_layout: str = "dense") -> torch.Tensor:
        lam = self.current_lambda() if self.margin > 1 else 0.0
        if self.training:
            self.iteration += 1
        return lsoftmax_logits(embeddings, weight, rows, targets, self.margin, lam, grad_layout)
