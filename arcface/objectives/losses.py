"""Losses other than the margin softmax: center loss, L-Softmax, and metric learning on embedding batches.

The margin-softmax family (NormFace, SphereFace, ArcFace, CosFace, combined, AdaFace, CurricularFace,
sub-center) lives in :mod:`arcface.head.margins`; this module holds the rest of the field:

* :func:`margin_cross_entropy` — the combined margin + softmax cross-entropy fused into one buffer
  (same value and gradient as ``F.cross_entropy(margin(cos_theta, labels), labels)``, less memory traffic);
* :class:`CenterLoss` — auxiliary pull of each embedding towards its class centre (used next to a
  softmax loss: ``total = ce + lambda_c * center``);
* :class:`LSoftmax` — large-margin softmax: multiplicative angular margin on *unnormalised* weights;
* metric learning on a batch of embeddings with integer identity labels:
  :func:`contrastive_loss` / :func:`batch_contrastive_loss`, :func:`triplet_loss` with FaceNet online
  mining (:func:`mine_triplets`: all anchor-positive pairs with semi-hard, hardest or random violating
  negatives), :func:`batch_hard_triplet_loss` ("TriHard"), :func:`lifted_structured_loss` and
  :class:`DistanceWeightedMarginLoss` ("Sampling Matters").

Conventions shared by every loss here:

* computed in fp32 with autocast disabled, whatever the input dtype (fp16/bf16 distances lose the small
  differences the margins are about);
* safe at coincident embeddings (distance 0, cosine +1) and antipodal ones (cosine -1): Euclidean
  distances use a square root whose gradient is defined as 0 at 0, angles clamp the cosine before
  ``acos``;
* a batch without any usable positive or negative pair (e.g. one image per identity) gives a loss of
  exactly 0 that is still connected to the graph (``backward()`` works, gradients are 0), never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arcface.head.margins import CombinedMargin

_ACOS_EPS = 1e-7
# below this squared distance two embeddings count as identical: sqrt's gradient is taken as 0 there
_ZERO_DIST2 = 1e-12

TRIPLET_MINING = ("all", "semihard", "hardest", "random_violating")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype != torch.float64 else t


def _zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """0 that still depends on the inputs, so ``backward()`` works on a batch with nothing to learn."""
    return embeddings.sum() * 0.0


def _check_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [B, D], got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be [B] with B={embeddings.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer identity ids, got dtype {labels.dtype}")


def pairwise_distances(embeddings: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """Euclidean distance matrix ``[B, B]`` (squared if asked), exactly 0 on the diagonal.

    Uses the Gram matrix (``|a|^2 + |b|^2 - 2ab``, O(B*D) memory instead of O(B*B*D)); negative round-off
    is clamped to 0, and the square root's gradient is 0 where two embeddings coincide (instead of inf).
    """
    squared_norms = (embeddings * embeddings).sum(dim=1)
    dist2 = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2.0 * embeddings @ embeddings.t()
    eye = torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    dist2 = dist2.clamp(min=0.0).masked_fill(eye, 0.0)
    if squared:
        return dist2
    nonzero = dist2 > _ZERO_DIST2
    # sqrt of a safe value where zero, then masked: no inf * 0 = NaN in the backward pass
    return torch.sqrt(torch.where(nonzero, dist2, torch.ones_like(dist2))) * nonzero


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive [B, B]: same identity, not the same sample; negative [B, B]: different identity)."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


# ----------------------------------------------------------------------------------------------------
# Fused combined-margin softmax cross-entropy (single device)
# ----------------------------------------------------------------------------------------------------

class _FusedMarginCrossEntropy(torch.autograd.Function):
    """Margin + scale + log-softmax + NLL in one [B, N] buffer; see :func:`margin_cross_entropy`."""

    @staticmethod
    def forward(ctx, cos_theta: torch.Tensor, labels: torch.Tensor, margin: CombinedMargin) -> torch.Tensor:
        valid = labels >= 0
        index = labels.clamp(min=0).unsqueeze(1)
        cos_target = cos_theta.gather(1, index).squeeze(1)
        # The target transform is O(B): differentiate it locally, so the backward pass never needs a
        # second [B, N] tensor for the gather's gradient.
        with torch.enable_grad():
            leaf = cos_target.detach().requires_grad_(True)
            new_target = margin.target_logit(leaf)
            if margin.gradient == "exact":
                (d_target,) = torch.autograd.grad(new_target.sum(), leaf)
            else:
                d_target = torch.ones_like(leaf)  # straight-through: as if no margin
        new_target = new_target.detach()
        scale = margin.scale
        buf = cos_theta * scale
        buf.scatter_(1, index, torch.where(valid, new_target, cos_target).unsqueeze(1) * scale)
        threshold = margin.interclass_filtering_threshold
        if threshold > 0:
            # only rows that count: an ignored row filtered entirely would make its softmax 0/0
            dirty = (cos_theta > threshold) & valid.unsqueeze(1)
            dirty.scatter_(1, index, torch.zeros_like(index, dtype=torch.bool))
            buf.masked_fill_(dirty, float("-inf"))
        # softmax's own kernel, not exp_/logsumexp: on CPU the element-wise exp takes a slow path for the
        # very negative arguments that s = 64 produces (several times slower than the whole softmax).
        probs = torch.softmax(buf, dim=1)
        # log-sum-exp without another exp pass: the largest probability sits at the largest logit, and
        # it is >= 1/N, so its log is accurate (the target's own probability may underflow to 0).
        row_max = buf.amax(dim=1)
        log_sum_exp = row_max - torch.log(probs.amax(dim=1))
        row_loss = log_sum_exp - new_target * scale
        num_valid = valid.sum().clamp(min=1).to(buf.dtype)
        loss = torch.where(valid, row_loss, torch.zeros_like(row_loss)).sum() / num_valid
        ctx.save_for_backward(probs, index, valid, d_target, num_valid)
        ctx.scale = scale
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, index, valid, d_target, num_valid = ctx.saved_tensors
        coef = grad_loss * ctx.scale / num_valid                  # d loss / d cos = s * g / n * (p - onehot)
        row_coef = torch.where(valid, coef, torch.zeros_like(coef))
        # out of place: the saved probabilities stay valid for a second backward (retain_graph, gradcheck)
        grad_cos = probs * row_coef.unsqueeze(1)
        p_target = grad_cos.gather(1, index).squeeze(1)
        grad_target = (p_target - coef) * d_target               # chain rule through the margin
        grad_cos.scatter_(1, index, torch.where(valid, grad_target, p_target).unsqueeze(1))
        return grad_cos, None, None


def margin_cross_entropy(cos_theta: torch.Tensor, labels: torch.Tensor,
                         margin: CombinedMargin) -> torch.Tensor:
    """``F.cross_entropy(margin(cos_theta, labels), labels, ignore_index=-1)`` fused into one pass.

    Mean over rows with ``labels >= 0``; rows with -1 are ignored (0 if all are). Same value and gradient
    as the modular path for every :class:`~arcface.head.margins.CombinedMargin` setting (all m1/m2/m3,
    exact or straight-through gradient, inter-class filtering), but the forward pass allocates one ``[B, N]``
    buffer, reused in place for the logits and the probabilities, and the backward pass one more for the
    gradient, instead of the five or so full-size tensors of the modular path. Use it for single-device
    training where the classifier fits on one device; the sharded Partial FC has its own distributed
    softmax.
    """
    if not isinstance(margin, CombinedMargin):
        raise ValueError("margin_cross_entropy supports CombinedMargin presets, got "
                         f"{type(margin).__name__}; use F.cross_entropy(margin(cos_theta, labels, ...), "
                         "labels) for the others")
    if cos_theta.dim() != 2 or labels.shape != cos_theta.shape[:1]:
        raise ValueError(f"need cos_theta [B, N] and labels [B], got {tuple(cos_theta.shape)} and "
                         f"{tuple(labels.shape)}")
    with torch.autocast(device_type=cos_theta.device.type, enabled=False):
        return _FusedMarginCrossEntropy.apply(_fp32(cos_theta), labels, margin)


# ----------------------------------------------------------------------------------------------------
# Center loss and L-Softmax (auxiliary / classification losses)
# ----------------------------------------------------------------------------------------------------

class CenterLoss(nn.Module):
    """Center loss: ``0.5 * mean_i ||x_i - c_{y_i}||^2`` with one centre per class.

    An *auxiliary* term: alone it collapses everything to one point, so train it next to a softmax
    loss, ``total = cross_entropy + lambda_c * center_loss`` (lambda_c ~ 0.003-0.01 on raw embeddings).

    Centre updates, two choices:

    * ``update="sgd"``: the centres are a parameter moved by your optimiser through the gradient of
      this loss (``-(x_i - c_j) / B`` summed over the batch rows of class j);
    * ``update="paper"``: the centres are a buffer and every training-mode ``forward`` moves each class
      present in the batch by ``alpha * sum_i (x_i - c_j) / (1 + n_j)``, the rule of the original paper,
      which makes the centre step independent of how often a class appears. The loss then only
      produces gradients for the embeddings.
    """

    def __init__(self, num_classes: int, embedding_size: int, *, update: str = "sgd",
                 alpha: float = 0.5) -> None:
        super().__init__()
        if num_classes <= 0 or embedding_size <= 0:
            raise ValueError(f"num_classes and embedding_size must be > 0, got {num_classes}, "
                             f"{embedding_size}")
        if update not in ("sgd", "paper"):
            raise ValueError(f"update must be 'sgd' or 'paper', got {update!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.num_classes, self.update, self.alpha = num_classes, update, alpha
        centers = torch.randn(num_classes, embedding_size) * 0.01
        if update == "sgd":
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(embeddings, labels)
        if embeddings.shape[0] == 0:
            return _zero_loss(embeddings) + (self.centers.sum() * 0.0 if self.update == "sgd" else 0.0)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got min {int(labels.min())} "
                             f"max {int(labels.max())}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = _fp32(embeddings)
            centers = self.centers.to(embeddings.dtype)
            residuals = embeddings - centers[labels]
            loss = 0.5 * (residuals * residuals).sum(dim=1).mean()
            if self.update == "paper" and self.training:
                self._paper_update(residuals.detach(), labels)
            return loss

    @torch.no_grad()
    def _paper_update(self, residuals: torch.Tensor, labels: torch.Tensor) -> None:
        # sum_i (x_i - c_j) and n_j per class, scattered: no Python loop over classes
        sums = torch.zeros_like(self.centers, dtype=residuals.dtype).index_add_(0, labels, residuals)
        counts = torch.zeros(self.num_classes, dtype=residuals.dtype, device=residuals.device)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=residuals.dtype))
        self.centers.add_((self.alpha * sums / (1.0 + counts).unsqueeze(1)).to(self.centers.dtype))


def lsoftmax_psi(theta: torch.Tensor, margin: int) -> torch.Tensor:
    """L-Softmax's target function ``psi(theta) = (-1)^k cos(m*theta) - 2k`` for theta in
    ``[k*pi/m, (k+1)*pi/m]``, k = 0..m-1: equals ``cos(m*theta)`` near 0, monotone decreasing on
    ``[0, pi]`` and continuously differentiable (both pieces have slope 0 at the joins)."""
    k = torch.clamp(torch.floor(theta * margin / math.pi), 0, margin - 1).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(margin * theta) - 2.0 * k


class LSoftmax(nn.Module):
    """L-Softmax (large-margin softmax) classifier: logits ``W x`` with *unnormalised* weights and
    features, except the target logit ``|W_y| |x| psi(theta_y)``, a multiplicative angular margin
    ``margin`` (an integer m >= 1; 1 is the plain linear softmax).

    ``base_weight`` (lambda >= 0) blends in the plain target logit,
    ``(lambda |W||x| cos(theta) + |W||x| psi(theta)) / (1 + lambda)``: the published recipe starts
    with a large lambda and anneals it towards 0, because the full margin is too hard at initialisation.
    Set ``self.base_weight`` from your schedule. Returns logits; apply ``F.cross_entropy`` yourself.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: int = 2, *,
                 base_weight: float = 0.0) -> None:
        super().__init__()
        if int(margin) != margin or margin < 1:
            raise ValueError(f"margin must be an integer >= 1, got {margin}")
        if base_weight < 0:
            raise ValueError(f"base_weight must be >= 0, got {base_weight}")
        self.margin, self.base_weight = int(margin), float(base_weight)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, base_weight={self.base_weight}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = _fp32(embeddings)
            weight = self.weight.to(embeddings.dtype)
            logits = embeddings @ weight.t()
            if self.margin == 1:
                return logits
            index = labels.unsqueeze(1)
            target_logit = logits.gather(1, index).squeeze(1)
            # |W_y||x|, floored so a zero embedding gives cos = 0 instead of 0/0
            norm_product = (weight[labels].norm(dim=1) * embeddings.norm(dim=1)).clamp(min=1e-12)
            cos_target = (target_logit / norm_product).clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS)
            psi = lsoftmax_psi(torch.acos(cos_target), self.margin)
            new_target = (self.base_weight * target_logit + norm_product * psi) / (1.0 + self.base_weight)
            return logits.scatter(1, index, new_target.unsqueeze(1))


# ----------------------------------------------------------------------------------------------------
# Metric learning
# ----------------------------------------------------------------------------------------------------

def contrastive_loss(embeddings_a: torch.Tensor, embeddings_b: torch.Tensor, same: torch.Tensor,
                     margin: float = 1.0) -> torch.Tensor:
    """Contrastive loss (DeepID2 / Hadsell et al.) on explicit pairs, averaged over pairs:
    ``0.5 * d^2`` for same-identity pairs, ``0.5 * max(margin - d, 0)^2`` for the others, with d the
    Euclidean distance between ``embeddings_a[i]`` and ``embeddings_b[i]``."""
    if embeddings_a.shape != embeddings_b.shape or embeddings_a.dim() != 2:
        raise ValueError(f"pair embeddings must both be [P, D], got {tuple(embeddings_a.shape)} and "
                         f"{tuple(embeddings_b.shape)}")
    if same.shape != embeddings_a.shape[:1]:
        raise ValueError(f"same must be [P]={embeddings_a.shape[0]}, got {tuple(same.shape)}")
    if embeddings_a.shape[0] == 0:
        return _zero_loss(embeddings_a) + _zero_loss(embeddings_b)
    with torch.autocast(device_type=embeddings_a.device.type, enabled=False):
        diff = _fp32(embeddings_a) - _fp32(embeddings_b)
        dist2 = (diff * diff).sum(dim=1)
        nonzero = dist2 > _ZERO_DIST2
        dist = torch.sqrt(torch.where(nonzero, dist2, torch.ones_like(dist2))) * nonzero
        same = same.bool()
        per_pair = torch.where(same, dist2, (margin - dist).clamp(min=0.0) ** 2)
        return 0.5 * per_pair.mean()


def batch_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, *,
                           normalize: bool = True) -> torch.Tensor:
    """Contrastive loss over every unordered pair ``i < j`` of the batch (same formula as
    :func:`contrastive_loss`), with positive and negative pairs each averaged separately and then summed,
    so a batch with few positives still pulls them together. 0 for a batch of one sample."""
    _check_batch(embeddings, labels)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = _fp32(embeddings)
        x = F.normalize(x, dim=1) if normalize else x
        dist = pairwise_distances(x)
        positive, negative = _pair_masks(labels)
        upper = torch.ones_like(positive).triu(diagonal=1)
        positive, negative = positive & upper, negative & upper
        loss = _zero_loss(x)
        if bool(positive.any()):
            loss = loss + 0.5 * (dist[positive] ** 2).mean()
        if bool(negative.any()):
            loss = loss + 0.5 * ((margin - dist[negative]).clamp(min=0.0) ** 2).mean()
        return loss


def mine_triplets(distances: torch.Tensor, labels: torch.Tensor, *, margin: float, mining: str = "semihard",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Triplets ``[T, 3]`` (anchor, positive, negative indices) mined inside a batch, FaceNet style:
    every anchor-positive pair ``(a, p)``, ``a != p``, same identity, in row-major order, gets at most
    one negative n (different identity), chosen from ``distances`` (treated as constants) by ``mining``:

    * ``"semihard"`` (FaceNet): among the negatives farther than the positive but still inside the
      margin, ``d(a,p) < d(a,n) < d(a,p) + margin``, the closest one; a pair without such a negative
      gives no triplet (harder negatives are skipped on purpose: they collapse training early);
    * ``"hardest"``: the closest negative ``argmin_n d(a,n)``;
    * ``"random_violating"`` (VGG-Face): a uniformly random negative among those violating the margin,
      ``d(a,n) < d(a,p) + margin``; none -> no triplet;
    * ``"all"``: every negative (one triplet per ``(a, p, n)``), no selection.

    Ties in argmin go to the lowest index.
    """
    if mining not in TRIPLET_MINING:
        raise ValueError(f"mining must be one of {TRIPLET_MINING}, got {mining!r}")
    positive, negative = _pair_masks(labels)
    distances = distances.detach()
    anchors, positives = positive.nonzero(as_tuple=True)
    if mining == "all":
        pair_idx, negs = negative[anchors].nonzero(as_tuple=True)
        return torch.stack([anchors[pair_idx], positives[pair_idx], negs], dim=1)
    d_ap = distances[anchors, positives].unsqueeze(1)            # [P, 1]
    d_an = distances[anchors]                                     # [P, B]
    is_neg = negative[anchors]                                    # [P, B]
    if mining == "semihard":
        candidates = is_neg & (d_an > d_ap) & (d_an < d_ap + margin)
    elif mining == "random_violating":
        candidates = is_neg & (d_an < d_ap + margin)
    else:
        candidates = is_neg
    has = candidates.any(dim=1)
    if mining == "random_violating":
        # uniform among candidates: the largest of i.i.d. uniform keys over the candidate set
        keys = torch.rand(candidates.shape, generator=generator, device=distances.device)
        chosen = keys.masked_fill(~candidates, -1.0).argmax(dim=1)
    else:
        chosen = d_an.masked_fill(~candidates, float("inf")).argmin(dim=1)
    return torch.stack([anchors[has], positives[has], chosen[has]], dim=1)


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, *,
                 mining: str = "semihard", squared: bool = True, normalize: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """FaceNet triplet loss ``mean over mined triplets of max(d(a,p) - d(a,n) + margin, 0)``.

    FaceNet's defaults: L2-normalised embeddings, squared Euclidean distances, margin 0.2, semi-hard
    online mining over all anchor-positive pairs (see :func:`mine_triplets`). 0 when nothing is mined.
    """
    _check_batch(embeddings, labels)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = _fp32(embeddings)
        x = F.normalize(x, dim=1) if normalize else x
        dist = pairwise_distances(x, squared=squared)
        triplets = mine_triplets(dist, labels, margin=margin, mining=mining, generator=generator)
        if triplets.shape[0] == 0:
            return _zero_loss(x)
        a, p, n = triplets.unbind(dim=1)
        return (dist[a, p] - dist[a, n] + margin).clamp(min=0.0).mean()


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, *,
                            squared: bool = False, soft_margin: bool = False,
                            normalize: bool = False) -> torch.Tensor:
    """Batch-hard triplet loss ("TriHard", Hermans et al.), for P x K batches: for each anchor, its
    hardest positive ``max_p d(a,p)`` and hardest negative ``min_n d(a,n)``; per anchor
    ``max(d_ap - d_an + margin, 0)`` (hinge) or ``log(1 + exp(d_ap - d_an))`` (``soft_margin``; the
    margin is then unused). Non-squared distances by default, as recommended. Anchors without a
    positive or without a negative are skipped; 0 if none remain."""
    _check_batch(embeddings, labels)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = _fp32(embeddings)
        x = F.normalize(x, dim=1) if normalize else x
        dist = pairwise_distances(x, squared=squared)
        positive, negative = _pair_masks(labels)
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not bool(valid.any()):
            return _zero_loss(x)
        hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)
        gap = hardest_pos[valid] - hardest_neg[valid]
        per_anchor = F.softplus(gap) if soft_margin else (gap + margin).clamp(min=0.0)
        return per_anchor.mean()


def lifted_structured_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, *,
                           normalize: bool = False) -> torch.Tensor:
    """Lifted structured embedding loss (Song et al. 2016), the smooth version: for each positive pair
    ``i < j``::

        J_ij = log( sum_{k in N(i)} exp(margin - D_ik) + sum_{l in N(j)} exp(margin - D_jl) ) + D_ij
        loss = 1 / (2 |P|) * sum_{(i,j) in P} max(J_ij, 0)^2

    with D non-squared Euclidean and N(i) the negatives of i. The log-sum-exp is a smooth upper bound of
    the hardest negative of either end, so every negative of the batch contributes. Positive pairs
    whose two ends have no negative at all are skipped (nothing to push); 0 if none remain."""
    _check_batch(embeddings, labels)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = _fp32(embeddings)
        x = F.normalize(x, dim=1) if normalize else x
        dist = pairwise_distances(x)
        positive, negative = _pair_masks(labels)
        # per sample: log sum_{k in N(i)} exp(margin - D_ik); -inf where i has no negative
        neg_lse = torch.logsumexp((margin - dist).masked_fill(~negative, float("-inf")), dim=1)
        has_neg = negative.any(dim=1)
        i, j = (positive & torch.ones_like(positive).triu(diagonal=1)).nonzero(as_tuple=True)
        keep = has_neg[i] | has_neg[j]
        i, j = i[keep], j[keep]
        if i.numel() == 0:
            return _zero_loss(x)
        # logaddexp of a finite and a -inf value is finite with a well-defined gradient
        pair_lse = torch.logaddexp(neg_lse[i], neg_lse[j])
        j_ij = pair_lse + dist[i, j]
        return (j_ij.clamp(min=0.0) ** 2).sum() / (2.0 * i.numel())


def distance_weights(distances: torch.Tensor, labels: torch.Tensor, embedding_size: int, *,
                     cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4) -> torch.Tensor:
    """Per-anchor negative sampling probabilities ``[B, B]`` of distance-weighted sampling.

    For unit-norm embeddings in ``embedding_size`` = n dimensions, pairwise distances follow
    ``q(d) ∝ d^(n-2) (1 - d^2/4)^((n-3)/2)``; sampling a negative with probability ∝ ``1 / q(d)``
    (d clamped below at ``cutoff`` to avoid the noisy closest ones) spreads the chosen negatives evenly
    over distances. Negatives at ``d >= nonzero_loss_cutoff`` (which give no loss) get 0. Rows whose
    every negative is that far fall back to uniform over their negatives; rows without negatives are 0.
    Computed in log space: ``1/q`` spans hundreds of orders of magnitude for n = 128.
    """
    n = float(embedding_size)
    _, negative = _pair_masks(labels)
    d = distances.detach().clamp(min=cutoff, max=2.0 - 1e-4)
    log_w = -(n - 2.0) * torch.log(d) - 0.5 * (n - 3.0) * torch.log((1.0 - 0.25 * d * d).clamp(min=1e-8))
    usable = negative & (distances.detach() < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~usable, float("-inf"))
    row_max = log_w.amax(dim=1, keepdim=True)
    has_usable = usable.any(dim=1, keepdim=True)
    weights = torch.exp(log_w - torch.where(has_usable, row_max, torch.zeros_like(row_max)))
    weights = torch.where(has_usable, weights, negative.to(weights.dtype))
    total = weights.sum(dim=1, keepdim=True)
    return weights / total.clamp(min=torch.finfo(weights.dtype).tiny)


class DistanceWeightedMarginLoss(nn.Module):
    """Margin loss with distance-weighted negative sampling ("Sampling Matters", Wu et al. 2017).

    Per pair ``(alpha + y * (D_ij - beta))_+`` with y = +1 for positives, -1 for negatives, D the
    Euclidean distance between L2-normalised embeddings, and ``beta`` a learnable boundary (one scalar,
    or one per class with ``num_classes``; the anchor's class is used). For every anchor-positive pair
    one negative of the anchor is drawn by :func:`distance_weights`. The loss is the sum over pairs
    divided by the number of pairs with a nonzero loss (the published normalisation), plus
    ``nu * mean(beta used)`` as beta's regulariser. 0 when no anchor has a positive and a negative.
    """

    def __init__(self, alpha: float = 0.2, beta_init: float = 1.2, *, num_classes: int | None = None,
                 nu: float = 0.0, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be > 0 or None, got {num_classes}")
        self.alpha, self.nu = float(alpha), float(nu)
        self.cutoff, self.nonzero_loss_cutoff = float(cutoff), float(nonzero_loss_cutoff)
        self.beta = nn.Parameter(torch.full((num_classes or 1,), float(beta_init)))
        self.per_class = num_classes is not None

    def sample(self, distances: torch.Tensor, labels: torch.Tensor, embedding_size: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[T, 3]`` (anchor, positive, negative): one sampled negative per anchor-positive pair."""
        positive, negative = _pair_masks(labels)
        anchors, positives = positive.nonzero(as_tuple=True)
        keep = negative[anchors].any(dim=1)
        anchors, positives = anchors[keep], positives[keep]
        if anchors.numel() == 0:
            return torch.zeros(0, 3, dtype=torch.long, device=labels.device)
        probs = distance_weights(distances, labels, embedding_size, cutoff=self.cutoff,
                                 nonzero_loss_cutoff=self.nonzero_loss_cutoff)
        negatives = torch.multinomial(probs[anchors], 1, generator=generator).squeeze(1)
        return torch.stack([anchors, positives, negatives], dim=1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(_fp32(embeddings), dim=1)
            dist = pairwise_distances(x)
            triplets = self.sample(dist, labels, x.shape[1], generator)
            if triplets.shape[0] == 0:
                return _zero_loss(x) + self.beta.sum() * 0.0
            a, p, n = triplets.unbind(dim=1)
            if self.per_class:
                if bool((labels.min() < 0) | (labels.max() >= self.beta.numel())):
                    raise ValueError(f"labels must be in [0, {self.beta.numel()}) for per-class beta")
                beta = self.beta[labels[a]].to(x.dtype)
            else:
                beta = self.beta.to(x.dtype).expand(a.shape[0])
            pos_loss = (self.alpha + dist[a, p] - beta).clamp(min=0.0)
            neg_loss = (self.alpha + beta - dist[a, n]).clamp(min=0.0)
            active = ((pos_loss > 0).sum() + (neg_loss > 0).sum()).clamp(min=1).to(x.dtype)
            loss = (pos_loss.sum() + neg_loss.sum()) / active
            return loss + self.nu * beta.mean()
