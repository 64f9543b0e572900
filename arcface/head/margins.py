"""Margin-based softmax logits on cosine similarities: the combined margin and its modern variants.

Every margin here is a single-device module ``forward(cos_theta [B, N], labels [B]) -> logits [B, N]``
where ``labels[i]`` is the *column* of row i's target class among these N columns, or ``-1`` when the
target is not among them. The sharded Partial FC applies the same modules, unchanged, to the local
(sampled) columns of each rank: a row whose target lives on another rank only gets scaled (and
filtered). Logits are computed in fp32 whatever the input dtype (fp64 stays fp64), with autocast
disabled.

The combined margin changes only the target logit::

    target = s * (cos(m1 * theta + m2) - m3),   theta = arccos(cos_theta[target])
    others = s * cos_theta

    m1: multiplicative angular margin (SphereFace; 1 = none)
    m2: additive angular margin       (ArcFace;   0 = none)
    m3: additive cosine margin        (CosFace / AM-Softmax; 0 = none)

Fallback beyond ``m1 * theta + m2 > pi``: there ``cos(m1*theta + m2)`` stops decreasing in theta, so a
target that is already far away would be *rewarded* for moving further. Past the crossing angle
``theta* = (pi - m2) / m1`` we continue with ``cos(theta) - (1 + cos(theta*)) - m3``: monotone
decreasing in theta and continuous at theta* (both sides equal ``-1 - m3``).

Gradient modes:

* ``"exact"`` (default): autograd differentiates the formula above (with the fallback), i.e. the true
  gradient of the loss w.r.t. ``cos_theta``. ``arccos`` has an infinite derivative at ``cos = +-1``;
  the cosine is clamped one machine epsilon inside ``[-1, 1]`` before ``arccos`` so no NaN/Inf can
  appear (at exactly +-1 the target's gradient is 0).
* ``"straight_through"``: the forward value is the same, but the gradient w.r.t. the target cosine is
  taken as if no margin had been applied (d target / d cos = 1), as some public recipes do by editing
  the logits in-place under ``no_grad``. It trains similarly and avoids the ``1/sin(theta)`` growth
  near theta = 0; it is *not* the gradient of the reported loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs (margins on half-precision cosines lose the target's small angle
    changes), fp64 kept as is (gradcheck and references)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _acos_eps(dtype: torch.dtype) -> float:
    """How far inside [-1, 1] cosines are clamped before ``acos``/``sqrt(1 - cos^2)``: one machine epsilon
    of the compute dtype, the smallest step that keeps the derivative finite (fp32: |d acos| <= ~2e3)
    while moving theta by no more than the dtype can resolve near 0 anyway."""
    return torch.finfo(dtype).eps

# name -> keyword arguments of CombinedMargin (or the class to use)
MARGIN_PRESETS: dict[str, dict[str, Any]] = {
    "softmax": {"m1": 1.0, "m2": 0.0, "m3": 0.0},       # NormFace: normalised softmax, scale only
    "normface": {"m1": 1.0, "m2": 0.0, "m3": 0.0},
    "sphereface": {"m1": 1.35, "m2": 0.0, "m3": 0.0},   # the combined-form SphereFace used in practice
    "arcface": {"m1": 1.0, "m2": 0.5, "m3": 0.0},
    "cosface": {"m1": 1.0, "m2": 0.0, "m3": 0.4},
    "am-softmax": {"m1": 1.0, "m2": 0.0, "m3": 0.35},
    "combined": {"m1": 1.0, "m2": 0.3, "m3": 0.2},
    "adaface": {"margin": 0.4, "h": 0.333},
    "curricularface": {"margin": 0.5},
}


def _target_columns(cos_theta: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_target [B] bool, gather index [B, 1]) — index 0 stands in for rows without a target."""
    has_target = labels >= 0
    return has_target, labels.clamp(min=0).unsqueeze(1)


def _replace_target(cos_theta: torch.Tensor, labels: torch.Tensor, new_target: torch.Tensor,
                    old_target: torch.Tensor, has_target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # Rows without a target write their own (unchanged) column-0 value back: a no-op that keeps the
    # whole operation free of data-dependent indexing (no host sync on GPU).
    new_target = torch.where(has_target, new_target, old_target)
    return cos_theta.scatter(1, index, new_target.unsqueeze(1))


class _ScaledWithTarget(torch.autograd.Function):
    """``logits = scale * cos_theta`` with row i's target column set to ``scale * new_target[i]``, and,
    with a filtering ``threshold > 0``, negatives whose cosine exceeds it set to ``-inf`` (no gradient).

    The composed version (``scatter``, ``masked_fill``, ``* scale``) makes four to eight ``[B, N]``
    temporaries forward and backward; this makes one float tensor each way (plus a bool mask when
    filtering). The target's local slope ``d new_target / d cos_target`` (``[B]``, from autograd on the
    margin formula) is supplied by the caller, so the gradient stays the formula's exact one.
    """

    @staticmethod
    def forward(ctx: Any, cos_theta: torch.Tensor, index: torch.Tensor,  # type: ignore[override]
                has_target: torch.Tensor, new_target: torch.Tensor, slope: torch.Tensor, scale: float,
                threshold: float) -> torch.Tensor:
        logits = (cos_theta * scale).scatter_(1, index, (new_target * scale).unsqueeze(1))
        dropped = None
        if threshold > 0:
            dropped = cos_theta.detach() > threshold
            # A row's own target is never dropped (rows without a target have no such column).
            dropped.scatter_(1, index, dropped.gather(1, index) & ~has_target.unsqueeze(1))
            logits.masked_fill_(dropped, float("-inf"))
        ctx.save_for_backward(index, slope, dropped)
        ctx.scale = scale
        return logits

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        index, slope, dropped = ctx.saved_tensors
        grad_target = grad_logits.gather(1, index) * (slope * ctx.scale).unsqueeze(1)
        grad_cos = (grad_logits * ctx.scale).scatter_(1, index, grad_target)
        if dropped is not None:
            grad_cos.masked_fill_(dropped, 0.0)
        return grad_cos, None, None, None, None, None, None


class CombinedMargin(nn.Module):
    """``s * (cos(m1*theta + m2) - m3)`` at the target, ``s * cos`` elsewhere (see module docstring).

    Args:
        scale: the logit scale s (64 in the ArcFace recipe).
        m1: SphereFace multiplicative angular margin (>= 1; 1 = none).
        m2: ArcFace additive angular margin in radians (0 = none).
        m3: CosFace additive cosine margin (0 = none).
        gradient: ``"exact"`` or ``"straight_through"``.
        interclass_filtering_threshold: if > 0, negatives with cosine above it are ignored (logit -inf):
            very confident "negatives" are most often the same person under another label (label
            noise), and pushing them away hurts.
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, *,
                 gradient: str = "exact", interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if m1 < 1.0 or m2 < 0.0 or m3 < 0.0:
            raise ValueError(f"margins must satisfy m1 >= 1, m2 >= 0, m3 >= 0; got {m1}, {m2}, {m3}")
        if gradient not in ("exact", "straight_through"):
            raise ValueError(f"gradient must be 'exact' or 'straight_through', got {gradient!r}")
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)
        self.gradient = gradient
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        # theta* where m1*theta + m2 reaches pi: beyond it the fallback keeps the target monotone.
        self.theta_star = min(math.pi, (math.pi - self.m2) / self.m1)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, m1(SphereFace)={self.m1}, m2(ArcFace)={self.m2}, "
                f"m3(CosFace)={self.m3}, gradient={self.gradient}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The unscaled target logit for target cosines ``cos_target`` (fp32)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3  # NormFace / CosFace: no angle needed, exact everywhere
        eps = _acos_eps(cos_target.dtype)
        theta = torch.acos(cos_target.clamp(-1.0 + eps, 1.0 - eps))
        with_margin = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.theta_star >= math.pi:
            return with_margin
        fallback = cos_target - (1.0 + math.cos(self.theta_star)) - self.m3
        return torch.where(theta <= self.theta_star, with_margin, fallback)

    def forward(self, cos_theta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=cos_theta.device.type, enabled=False):
            cos_theta = cos_theta.to(_compute_dtype(cos_theta))
            has_target, index = _target_columns(cos_theta, labels)
            cos_target = cos_theta.detach().gather(1, index).squeeze(1)
            # The [B] target values and their exact slopes come from autograd on the formula; the
            # [B, N] work is one fused pass each way (_ScaledWithTarget).
            with torch.enable_grad():
                target_var = cos_target.clone().requires_grad_(cos_theta.requires_grad)
                new_target = self.target_logit(target_var)
                if self.gradient == "straight_through":
                    new_target = target_var + (new_target - target_var).detach()
            if cos_theta.requires_grad:
                slope, = torch.autograd.grad(new_target.sum(), target_var)
                slope = torch.where(has_target, slope, torch.ones_like(slope))
            else:
                slope = torch.ones_like(cos_target)
            new_target = torch.where(has_target, new_target.detach(), cos_target)
            return _ScaledWithTarget.apply(cos_theta, index, has_target, new_target, slope, self.scale,
                                           self.interclass_filtering_threshold)


class AdaFace(nn.Module):
    """AdaFace: the margin adapts to image quality, using the embedding norm as its proxy.

    Per row, ``z = clip((norm - mean) / (std + eps) * h, -1, 1)`` with running batch statistics of
    the norms; the target gets an angular margin ``-m*z`` and an additive one ``m + m*z``:
    high-quality (large-norm) images are pushed like ArcFace, low-quality ones like CosFace with a
    smaller margin. ``forward`` needs ``embedding_norms`` for every row (the sharded classifier has
    them: the embeddings are all-gathered), so the batch statistics are global without extra
    communication.
    """

    needs_embedding_norms = True

    def __init__(self, scale: float = 64.0, margin: float = 0.4, h: float = 0.333,
                 momentum: float = 0.01, eps: float = 1e-3) -> None:
        super().__init__()
        self.scale, self.margin, self.h, self.momentum, self.eps = scale, margin, h, momentum, eps
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, cos_theta: torch.Tensor, labels: torch.Tensor,
                embedding_norms: torch.Tensor | None = None) -> torch.Tensor:
        if embedding_norms is None:
            raise ValueError("AdaFace needs embedding_norms (the L2 norm of each row's embedding)")
        with torch.autocast(device_type=cos_theta.device.type, enabled=False):
            cos_theta = cos_theta.to(_compute_dtype(cos_theta))
            norms = embedding_norms.detach().to(cos_theta.dtype).clamp(0.001, 100.0)
            if self.training:
                with torch.no_grad():
                    std = norms.std() if norms.numel() > 1 else norms.new_tensor(0.0)
                    self.batch_mean.mul_(1 - self.momentum).add_(self.momentum * norms.mean())
                    self.batch_std.mul_(1 - self.momentum).add_(self.momentum * std)
            z = ((norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)
            has_target, index = _target_columns(cos_theta, labels)
            cos_target = cos_theta.gather(1, index).squeeze(1)
            eps = _acos_eps(cos_theta.dtype)
            theta = torch.acos(cos_target.clamp(-1.0 + eps, 1.0 - eps))
            theta = (theta - self.margin * z).clamp(eps, math.pi - eps)
            new_target = torch.cos(theta) - (self.margin + self.margin * z)
            logits = _replace_target(cos_theta, labels, new_target, cos_target, has_target, index)
            return logits * self.scale


class CurricularFace(nn.Module):
    """CurricularFace: ArcFace target plus a curriculum on hard negatives.

    A negative whose cosine exceeds the row's margin-applied target ``cos(theta + m)`` (the cosine clamped
    one epsilon inside [-1, 1] first, as for the combined margin) is "hard" and its logit becomes
    ``cos * (t + cos)``; ``t`` follows the running mean of target cosines, so hard
    negatives weigh little early in training and more later.

    Both statistics involve the target of every row, which in the sharded classifier lives on one
    rank only: ``forward`` takes ``row_target_cos`` ([B], every row's target cosine, already reduced
    across ranks — a sum all-reduce of the local values with zeros elsewhere). Single-device callers
    whose rows all have their target present may omit it.
    """

    needs_row_target_cos = True

    def __init__(self, scale: float = 64.0, margin: float = 0.5, momentum: float = 0.01) -> None:
        super().__init__()
        self.scale, self.margin, self.momentum = scale, margin, momentum
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin
        self.register_buffer("t", torch.zeros(()))

    def _margin_target(self, cos_target: torch.Tensor) -> torch.Tensor:
        """``cos(theta + m)`` with the cosine clamped one epsilon inside [-1, 1], as in ``CombinedMargin``:
        the same value as ``cos(acos(c) + m)`` of the clamped ``c`` and a finite slope at ``cos = +-1``.
        (Clamping ``1 - cos^2`` instead would put ``sin(theta)`` at sqrt(eps) rather than
        ``sqrt(1 - (1 - eps)^2)``, moving the fp32 target logit at cos = 1 by 4e-3 at scale 64.)"""
        eps = _acos_eps(cos_target.dtype)
        cos_target = cos_target.clamp(-1.0 + eps, 1.0 - eps)
        sin_target = torch.sqrt(1.0 - cos_target * cos_target)
        return cos_target * self.cos_m - sin_target * self.sin_m  # cos(theta + m)

    def _final_target(self, cos_target: torch.Tensor) -> torch.Tensor:
        # ArcFace's fallback past theta + m > pi keeps the target logit monotone in theta
        return torch.where(cos_target > self.threshold, self._margin_target(cos_target), cos_target - self.mm)

    def forward(self, cos_theta: torch.Tensor, labels: torch.Tensor,
                row_target_cos: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=cos_theta.device.type, enabled=False):
            cos_theta = cos_theta.to(_compute_dtype(cos_theta)).clamp(-1.0, 1.0)
            has_target, index = _target_columns(cos_theta, labels)
            cos_target = cos_theta.gather(1, index).squeeze(1)
            if row_target_cos is None:
                if not bool(has_target.all()):
                    raise ValueError("CurricularFace needs row_target_cos when some rows' targets are "
                                     "not among these columns")
                row_target_cos = cos_target
            row_target_cos = row_target_cos.to(cos_theta.dtype).clamp(-1.0, 1.0)
            # "hard" is judged against cos(theta + m) itself, as the paper defines it (no fallback)
            row_margin_target = self._margin_target(row_target_cos).detach()
            if self.training:
                with torch.no_grad():
                    self.t.mul_(1 - self.momentum).add_(self.momentum * row_target_cos.detach().mean())
            hard = cos_theta > row_margin_target.unsqueeze(1)
            logits = torch.where(hard, cos_theta * (self.t.detach() + cos_theta), cos_theta)
            new_target = self._final_target(cos_target)
            logits = _replace_target(logits, labels, new_target, logits.gather(1, index).squeeze(1),
                                     has_target, index)
            return logits * self.scale


def subcenter_max(cos_theta_k: torch.Tensor, k: int) -> torch.Tensor:
    """Sub-center ArcFace: each class owns ``k`` centres (rows ``class*k .. class*k + k-1`` of the
    classifier); its cosine is the max over them. ``[B, N*k]`` or ``[B, N, k]`` -> ``[B, N]``.
    Apply it to the cosines before any margin; noisy images then attach to a non-dominant sub-centre
    instead of dragging the dominant one."""
    if cos_theta_k.dim() == 2:
        if cos_theta_k.shape[1] % k != 0:
            raise ValueError(f"{cos_theta_k.shape[1]} columns are not a multiple of k={k}")
        cos_theta_k = cos_theta_k.view(cos_theta_k.shape[0], -1, k)
    return cos_theta_k.amax(dim=2)


def build_margin(name: str, **overrides: Any) -> nn.Module:
    """Build a margin module from a preset name (see ``MARGIN_PRESETS``), overriding any argument."""
    key = name.lower()
    if key not in MARGIN_PRESETS:
        raise ValueError(f"unknown margin {name!r}; known: {', '.join(MARGIN_PRESETS)}")
    kwargs = {**MARGIN_PRESETS[key], **overrides}
    if key == "adaface":
        return AdaFace(**kwargs)
    if key == "curricularface":
        return CurricularFace(**kwargs)
    return CombinedMargin(**kwargs)


def margin_softmax_loss(margin: nn.Module, cos_theta: torch.Tensor, labels: torch.Tensor,
                        **margin_inputs: torch.Tensor) -> torch.Tensor:
    """Single-device margin softmax cross-entropy (mean over rows); the dense reference the sharded
    classifier is tested against."""
    logits = margin(cos_theta, labels, **margin_inputs)
    return F.cross_entropy(logits, labels)
