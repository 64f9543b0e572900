"""Pair- and triplet-based objectives over the GLOBAL batch: FaceNet triplet (``loss.kind = "triplet"``),
contrastive (``"contrastive"``), lifted structured (``"lifted"``) and the distance-weighted margin loss
(``"margin"``).

These losses compare the embeddings of a batch with each other, so "the batch" must be the global one:
mining the hardest or semi-hard negatives inside each rank's micro-batch would make the selection, and
the trained model, depend on the number of ranks. How the work and the gradient are split over ranks:

1. every rank L2-normalises its own rows (where the paper does) and all-gathers them with autograd
   (:func:`arcface.distributed.all_gather_autograd`, whose backward SUMS each row's incoming gradients
   over ranks into the row's owner);
2. rank r computes the terms of the global loss whose ANCHOR (first index) is one of its own rows: the
   distance rows ``[b, B]`` of its anchors against the whole batch, the mining, the per-anchor terms.
   Every mining rule here reads only its anchor's row of distances (FaceNet's semi-hard negative of a
   pair ``(a, p)``, the hardest positive / negative of an anchor, the distance-weighted negative of an
   anchor), so splitting by anchor selects exactly the triplets one process would select on the whole
   batch; symmetric pair terms are taken in both orders (``(i, j)`` on the rank of i, ``(j, i)`` on the
   rank of j), which doubles both the sum and the count;
3. normalisers (numbers of triplets, pairs, active terms) are global: one small vector of sums and counts
   per rank is all-gathered and summed in rank order, identically on every rank;
4. rank r's *partial* loss is its terms divided by the global normalisers, so the partial losses of the
   ranks sum to the global loss. Each rank's backward gives every row of the batch its share of the
   gradient, and the gather's backward adds the shares up in the row's owner: each rank receives for
   its local embeddings exactly the gradient of the global-batch loss (the contract of
   :mod:`arcface.objectives`);
5. the value returned is the global loss, the same on every rank; its backward feeds the partial loss
   (:class:`_GlobalValue`).

Why partial losses instead of every rank computing the same replicated loss on the gathered batch and
keeping its own slice of the gradient (also exact): the replicated version does the whole ``O(B^2 D)``
distance and mining work W times over, the partial one does ``1/W`` of it per rank.

A batch without anything to learn from (no two images of one identity, or a single identity) gives a loss of
exactly 0 with zero gradients, never NaN; ``log_values()`` then shows ``positive_pairs 0``. Everything runs in
fp32 with autocast disabled (fp64 inputs stay fp64), like :mod:`arcface.objectives.losses`, whose
single-device functions are the references these objectives are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arcface.config import TRIPLET_MINING
from arcface.distributed import all_gather_autograd, all_gather_tensor, get_rank, get_world_size
from arcface.objectives import Objective, register_objective

__all__ = ["GlobalBatch", "gather_global_batch", "global_sums", "TripletObjective", "ContrastiveObjective",
           "LiftedStructuredObjective", "MarginObjective", "TRIPLET_MINING", "MARGIN_STATE_FILE"]

#: the margin objective's replicated state in a training checkpoint (written by rank 0)
MARGIN_STATE_FILE = "margin_objective.pt"
# below this squared distance two embeddings count as identical: sqrt's gradient is taken as 0 there
_ZERO_DIST2 = 1e-12
# Distance-weighted sampling (Wu et al. 2017): distances are clamped below at CUTOFF before weighting (the
# closest negatives are mostly noise), and negatives beyond NONZERO_LOSS_CUTOFF are never drawn (with
# alpha = 0.2 and beta around 1.2 they give no loss).
_DW_CUTOFF = 0.5
_DW_NONZERO_LOSS_CUTOFF = 1.4


# ----------------------------------------------------------------------------------------------------
# The global batch, seen from one rank
# ----------------------------------------------------------------------------------------------------

@dataclass
class GlobalBatch:
    """This rank's rows and the whole global batch (rank order), both in the autograd graph."""

    rows: torch.Tensor          # [b, D] this rank's embeddings (normalised where the objective asks)
    total: torch.Tensor         # [B, D] every rank's rows, gathered with autograd
    row_labels: torch.Tensor    # [b]
    labels: torch.Tensor        # [B]
    start: int                  # global index of rows[0]

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    def self_mask(self) -> torch.Tensor:
        """``[b, B]``: True where the column is the row itself."""
        mask = torch.zeros(self.num_rows, self.total.shape[0], dtype=torch.bool, device=self.rows.device)
        local = torch.arange(self.num_rows, device=self.rows.device)
        mask[local, local + self.start] = True
        return mask

    def squared_distances(self) -> torch.Tensor:
        """``[b, B]`` squared Euclidean distances of this rank's rows to every row, exactly 0 to itself
        (the Gram form ``|a|^2 + |b|^2 - 2ab``: O((b + B) D) memory, round-off below 0 clamped)."""
        rows_sq = (self.rows * self.rows).sum(dim=1)
        total_sq = (self.total * self.total).sum(dim=1)
        dist2 = rows_sq.unsqueeze(1) + total_sq.unsqueeze(0) - 2.0 * self.rows @ self.total.t()
        return dist2.clamp(min=0.0).masked_fill(self.self_mask(), 0.0)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, B]`` (positive: same identity, not the row itself; negative: another identity)."""
        same = self.row_labels.unsqueeze(1) == self.labels.unsqueeze(0)
        return same & ~self.self_mask(), ~same

    def positive_pairs(self) -> torch.Tensor:
        """Number of unordered same-identity pairs in the GLOBAL batch (a count, same on every rank)."""
        _, counts = torch.unique(self.labels, return_counts=True)
        return (counts * (counts - 1) // 2).sum()

    def graph_zero(self) -> torch.Tensor:
        """A 0 that depends on every gathered row: every rank's partial loss reaches the gather, so the
        gather's backward collective runs on all ranks even where a rank has no terms of its own."""
        return self.total.sum() * 0.0


def euclidean(dist2: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of squared distances with the gradient defined as 0 where they are 0 (coincident points)."""
    nonzero = dist2 > _ZERO_DIST2
    return torch.sqrt(torch.where(nonzero, dist2, torch.ones_like(dist2))) * nonzero


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype != torch.float64 else t


def gather_global_batch(embeddings: torch.Tensor, labels: torch.Tensor, *, normalize: bool) -> GlobalBatch:
    """Normalise (if asked) this rank's micro-batch and all-gather it with autograd; every rank must pass
    the same number of rows."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [batch, D], got shape {tuple(embeddings.shape)}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be [{embeddings.shape[0]}], got shape {tuple(labels.shape)}")
    rows = _float(embeddings)
    rows = F.normalize(rows, dim=1) if normalize else rows
    labels = labels.to(device=rows.device, dtype=torch.long)
    world_size = get_world_size()
    if world_size == 1:
        return GlobalBatch(rows, rows, labels, labels, 0)
    return GlobalBatch(rows, all_gather_autograd(rows), labels, all_gather_tensor(labels),
                       get_rank() * rows.shape[0])


def global_sums(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a small 1-D tensor of per-rank sums and counts (no autograd), in float64.

    Gathered and then added in rank order, so the result is bit-identical on every rank (a ring
    all-reduce need not be)."""
    values = values.detach().to(torch.float64)
    world_size = get_world_size()
    if world_size == 1:
        return values
    return all_gather_tensor(values.contiguous()).view(world_size, -1).sum(dim=0)


class _GlobalValue(torch.autograd.Function):
    """Forward: the global loss value (identical on every rank). Backward: the incoming gradient goes to
    this rank's partial loss, whose gradients summed over ranks are those of the global loss."""

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return value.detach().to(partial.dtype).clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output, None


def global_loss(partial: torch.Tensor, value: torch.Tensor, batch: GlobalBatch) -> torch.Tensor:
    """The global ``value`` whose gradient is that of this rank's ``partial`` loss (see the module doc).

    A non-finite embedding anywhere in the global batch makes the value non-finite on every rank (mining
    may leave that row out of every term, but its gradient is NaN anyway), so the loop skips the update
    as it does for the margin softmax; for finite embeddings the value is unchanged (``+ 0.0``)."""
    poison = batch.total.detach().sum().to(torch.float64) * 0.0
    return _GlobalValue.apply(partial, value + poison)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (e.g. no triplet in the batch)."""
    return numerator / denominator.clamp(min=1.0)


class _GlobalBatchObjective(Objective):
    """Shared parts: rank bookkeeping, fp32 math outside autocast, the log values of the last forward."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if world_size != get_world_size():
            raise ValueError(f"objective built for world size {world_size}, but the process group has "
                             f"{get_world_size()} ranks")
        self.rank, self.world_size = rank, world_size
        self._logged: dict[str, torch.Tensor] = {}
        #: ``[T, 3]`` global (anchor, positive, negative) indices of the triplets this rank used in the last
        #: forward (triplet and margin objectives), for inspection and tests
        self.last_triplets: torch.Tensor | None = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._loss(embeddings, labels)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _log(self, **values: torch.Tensor) -> None:
        # Kept as tensors: read (a host sync) only when the loop logs.
        self._logged = {key: value.detach() for key, value in values.items()}

    def log_values(self) -> dict[str, float]:
        return {key: float(value) for key, value in self._logged.items()}


# ----------------------------------------------------------------------------------------------------
# FaceNet triplet loss
# ----------------------------------------------------------------------------------------------------

@register_objective
class TripletObjective(_GlobalBatchObjective):
    """FaceNet triplet loss on L2-normalised (or, ``normalize=False``, raw) embeddings with online mining
    over the global batch.

    ``semihard`` (FaceNet): every anchor-positive pair ``(a, p)`` of the global batch gets the closest
    negative with ``d(a,p) < d(a,n) < d(a,p) + margin``; pairs without one are skipped; loss = mean over
    the mined triplets of ``max(d(a,p) - d(a,n) + margin, 0)``. ``batch_hard`` (TriHard, Hermans et al.):
    per anchor the farthest positive and the closest negative, hinge with the margin, mean over anchors
    that have both. ``soft_margin``: the same pairs through ``log(1 + exp(d_ap - d_an))``. ``d`` is the
    squared (FaceNet) or plain Euclidean distance. Reference: :func:`arcface.objectives.losses.triplet_loss`,
    :func:`arcface.objectives.losses.batch_hard_triplet_loss`.
    """

    kind = "triplet"

    def __init__(self, margin: float = 0.2, mining: str = "semihard", squared: bool = True,
                 normalize: bool = True, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size)
        if mining not in TRIPLET_MINING:
            raise ValueError(f"loss.triplet_mining must be one of {TRIPLET_MINING}, got {mining!r}")
        if not margin > 0:
            raise ValueError(f"loss.triplet_margin must be > 0, got {margin}")
        self.margin, self.mining, self.squared = float(margin), mining, bool(squared)
        self.normalize = bool(normalize)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> TripletObjective:
        loss = cfg.loss
        return cls(loss.triplet_margin, loss.triplet_mining, loss.triplet_distance == "squared",
                   loss.triplet_normalize, rank=rank, world_size=world_size)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = gather_global_batch(embeddings, labels, normalize=self.normalize)
        dist2 = batch.squared_distances()
        dist = dist2 if self.squared else euclidean(dist2)
        positive, negative = batch.masks()
        if self.mining == "semihard":
            terms, candidates, triplets = self._semihard(dist, positive, negative)
            active = terms > 0
            self.last_triplets = triplets + torch.tensor([batch.start, 0, 0], device=triplets.device)
        else:
            terms, candidates, active = self._batch_hard(dist, positive, negative)
            self.last_triplets = None
        count = terms.new_tensor(float(terms.numel()))
        local = torch.stack([terms.sum().detach(), count, active.sum().to(terms.dtype),
                             candidates.to(terms.dtype)])
        total_sum, num_terms, num_active, num_candidates = global_sums(local)
        partial = _ratio(terms.sum(), num_terms.to(terms.dtype)) + batch.graph_zero()
        self._log(positive_pairs=batch.positive_pairs(), triplets=num_terms,
                  active_triplets=_ratio(num_active, num_candidates))
        return global_loss(partial, _ratio(total_sum, num_terms), batch)

    def _semihard(self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hinge terms of the mined triplets, number of anchor-positive pairs, local [T, 3] triplets)."""
        anchors, positives = positive.nonzero(as_tuple=True)     # row-major: FaceNet's "all pairs"
        d_ap = dist.detach()[anchors, positives].unsqueeze(1)     # [P, 1]
        d_an = dist.detach()[anchors]                             # [P, B]
        candidates = negative[anchors] & (d_an > d_ap) & (d_an < d_ap + self.margin)
        found = candidates.any(dim=1)
        chosen = d_an.masked_fill(~candidates, math.inf).argmin(dim=1)
        a, p, n = anchors[found], positives[found], chosen[found]
        terms = (dist[a, p] - dist[a, n] + self.margin).clamp(min=0.0)
        return terms, torch.tensor(anchors.numel(), device=dist.device), torch.stack([a, p, n], dim=1)

    def _batch_hard(self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-anchor terms, number of anchors with a positive and a negative, which terms are active)."""
        valid = positive.any(dim=1) & negative.any(dim=1)
        hardest_positive = dist.masked_fill(~positive, -math.inf).amax(dim=1)
        hardest_negative = dist.masked_fill(~negative, math.inf).amin(dim=1)
        gap = hardest_positive[valid] - hardest_negative[valid]
        if self.mining == "soft_margin":
            # active: the closest negative is closer than the farthest positive
            return F.softplus(gap), valid.sum(), gap > 0
        terms = (gap + self.margin).clamp(min=0.0)
        return terms, valid.sum(), terms > 0

    def describe(self) -> str:
        distance = "squared Euclidean" if self.squared else "Euclidean"
        rule = {"semihard": "semi-hard negatives (FaceNet)", "batch_hard": "batch-hard (TriHard)",
                "soft_margin": "batch-hard, soft margin"}[self.mining]
        embeddings = "L2-normalised" if self.normalize else "raw"
        return (f"triplet loss over the global batch: {rule}, margin {self.margin:g} on {distance} distances "
                f"of {embeddings} embeddings (needs several images per identity in each global batch)")


# ----------------------------------------------------------------------------------------------------
# Contrastive (DeepID2's verification signal)
# ----------------------------------------------------------------------------------------------------

@register_objective
class ContrastiveObjective(_GlobalBatchObjective):
    """Contrastive loss over every pair of the global batch (DeepID2's verification signal, Hadsell et
    al.) on L2-normalised embeddings: ``0.5 d^2`` for same-identity pairs, ``0.5 max(margin - d, 0)^2``
    for the others, d Euclidean; positive and negative pairs are each averaged, then added (so a batch
    with few positives still pulls them together).
    Reference: :func:`arcface.objectives.losses.batch_contrastive_loss`.
    """

    kind = "contrastive"

    def __init__(self, margin: float = 1.0, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size)
        if not margin > 0:
            raise ValueError(f"loss.contrastive_margin must be > 0, got {margin}")
        self.margin = float(margin)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> ContrastiveObjective:
        return cls(cfg.loss.contrastive_margin, rank=rank, world_size=world_size)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = gather_global_batch(embeddings, labels, normalize=True)
        dist2 = batch.squared_distances()
        positive, negative = batch.masks()
        # Ordered pairs (i local, j anywhere): every unordered pair is counted once on each end's rank,
        # which doubles its sum and its count alike; the means are those over unordered pairs.
        positive_sum = 0.5 * dist2[positive].sum()
        hinge = (self.margin - euclidean(dist2)[negative]).clamp(min=0.0)
        negative_sum = 0.5 * (hinge * hinge).sum()
        local = torch.stack([positive_sum.detach(), negative_sum.detach(), positive.sum().to(dist2.dtype),
                             negative.sum().to(dist2.dtype), (hinge > 0).sum().to(dist2.dtype)])
        pos_total, neg_total, num_pos, num_neg, num_active = global_sums(local)
        dtype = dist2.dtype
        partial = (_ratio(positive_sum, num_pos.to(dtype)) + _ratio(negative_sum, num_neg.to(dtype))
                   + batch.graph_zero())
        self._log(positive_pairs=batch.positive_pairs(), active_negatives=_ratio(num_active, num_neg))
        return global_loss(partial, _ratio(pos_total, num_pos) + _ratio(neg_total, num_neg), batch)

    def describe(self) -> str:
        return (f"contrastive loss over all pairs of the global batch, margin {self.margin:g} on "
                "L2-normalised embeddings (needs several images per identity in each global batch)")


# ----------------------------------------------------------------------------------------------------
# Lifted structured embedding
# ----------------------------------------------------------------------------------------------------

@register_objective
class LiftedStructuredObjective(_GlobalBatchObjective):
    """Lifted structured loss (Song et al. 2016, the smooth form) over the global batch, raw embeddings::

        J_ij = log( sum_{k in N(i)} exp(margin - D_ik) + sum_{l in N(j)} exp(margin - D_jl) ) + D_ij
        loss = 1 / (2 |P|) * sum_{(i,j) in P} max(J_ij, 0)^2

    over the positive pairs ``i < j`` whose ends have a negative. Each rank computes the negative
    log-sum-exp of its own rows and all-gathers it with autograd (a second, ``[B]``-sized gather), since
    ``J_ij`` needs both ends'. Reference: :func:`arcface.objectives.losses.lifted_structured_loss`.
    """

    kind = "lifted"

    def __init__(self, margin: float = 1.0, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size)
        if not margin > 0:
            raise ValueError(f"loss.lifted_margin must be > 0, got {margin}")
        self.margin = float(margin)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> LiftedStructuredObjective:
        return cls(cfg.loss.lifted_margin, rank=rank, world_size=world_size)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = gather_global_batch(embeddings, labels, normalize=False)
        dist = euclidean(batch.squared_distances())
        positive, negative = batch.masks()
        # per row: log sum_{k in N(i)} exp(margin - D_ik); -inf for a row without negatives
        row_lse = torch.logsumexp((self.margin - dist).masked_fill(~negative, -math.inf), dim=1)
        lse = all_gather_autograd(row_lse) if get_world_size() > 1 else row_lse
        has_negative = ~torch.isneginf(lse)
        i, j = positive.nonzero(as_tuple=True)           # ordered pairs: i local, j global
        keep = has_negative[i + batch.start] | has_negative[j]
        i, j = i[keep], j[keep]
        # logaddexp of a finite and a -inf value is finite with a well-defined gradient
        lifted = torch.logaddexp(lse[i + batch.start], lse[j]) + dist[i, j]
        terms = lifted.clamp(min=0.0) ** 2
        local = torch.stack([terms.sum().detach(), dist.new_tensor(float(i.numel())),
                             (lifted > 0).sum().to(dist.dtype)])
        total_sum, num_pairs, num_active = global_sums(local)
        # Ordered pairs: num_pairs = 2 |P| and the sum is twice the one over unordered pairs, so
        # sum_unordered / (2 |P|) = sum_ordered / (2 num_pairs).
        denominator = 2.0 * num_pairs.clamp(min=1.0)
        graph_zero = batch.graph_zero() + torch.where(has_negative, lse, torch.zeros_like(lse)).sum() * 0.0
        partial = terms.sum() / denominator.to(dist.dtype) + graph_zero
        self._log(positive_pairs=batch.positive_pairs(), active_pairs=_ratio(num_active, num_pairs))
        return global_loss(partial, total_sum / denominator, batch)

    def describe(self) -> str:
        return (f"lifted structured loss over the global batch, margin {self.margin:g} on raw embeddings "
                "(needs several images per identity in each global batch)")


# ----------------------------------------------------------------------------------------------------
# Distance-weighted sampling + margin loss
# ----------------------------------------------------------------------------------------------------

def distance_weighted_probabilities(dist: torch.Tensor, negative: torch.Tensor, embedding_size: int
                                    ) -> torch.Tensor:
    """``[b, B]`` probabilities of drawing each negative for each anchor row: ``∝ 1 / q(d)``, with
    ``q(d) ∝ d^(n-2) (1 - d^2/4)^((n-3)/2)`` the density of distances between uniform points of the unit
    sphere in n dimensions, d clamped to ``[0.5, 2)``; negatives at ``d >= 1.4`` get 0, a row whose every
    negative is that far is uniform over its negatives, a row without negatives is 0. In log space:
    ``1/q`` spans hundreds of orders of magnitude at n = 512."""
    n = float(embedding_size)
    d = dist.detach().clamp(min=_DW_CUTOFF, max=2.0 - 1e-4)
    log_w = -(n - 2.0) * torch.log(d) - 0.5 * (n - 3.0) * torch.log((1.0 - 0.25 * d * d).clamp(min=1e-8))
    usable = negative & (dist.detach() < _DW_NONZERO_LOSS_CUTOFF)
    log_w = log_w.masked_fill(~usable, -math.inf)
    has_usable = usable.any(dim=1, keepdim=True)
    row_max = torch.where(has_usable, log_w.amax(dim=1, keepdim=True), torch.zeros_like(log_w[:, :1]))
    weights = torch.where(has_usable, torch.exp(log_w - row_max), negative.to(log_w.dtype))
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


def sample_by_inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the column ``n`` with ``cdf[n-1] <= u * cdf[-1] < cdf[n]`` (a zero-probability column is
    never chosen); ``probabilities [R, B]`` with a nonzero sum per row, ``uniforms [R]`` in [0, 1)."""
    cdf = probabilities.cumsum(dim=1)
    target = uniforms.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    chosen = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # u * total may round up to the total itself: fall back to the last column that has probability
    columns = torch.arange(probabilities.shape[1], device=probabilities.device)
    last = torch.where(probabilities > 0, columns, torch.zeros_like(columns)).amax(dim=1)
    return torch.minimum(chosen, last)


@register_objective
class MarginObjective(_GlobalBatchObjective):
    """Margin loss with distance-weighted negative sampling ("Sampling Matters", Wu et al. 2017).

    On L2-normalised embeddings with Euclidean distances D: every anchor-positive pair ``(a, p)`` of the
    global batch (anchors that have a negative) draws one negative n of the anchor with probability
    :func:`distance_weighted_probabilities`; the loss is::

        (sum (alpha + D_ap - beta)_+ + sum (alpha + beta - D_an)_+) / (number of nonzero terms) + nu * beta

    with beta a learnable scalar boundary, trained by its own SGD (``loss.margin_beta_lr``). Reference:
    :class:`arcface.objectives.losses.DistanceWeightedMarginLoss` (with one global beta).

    The draw is W-independent and reproducible: one uniform number per anchor-positive pair of the global
    batch (row-major order) from the objective's own seeded CPU generator, the same on every rank, each
    rank using those of its anchors; the negative is the inverse CDF of the anchor's probabilities at that
    number. beta and its gradient are replicated: the gradient ``d loss / d beta = (#active negative terms
    - #active positive terms) / #active + nu`` is global and computed from the all-gathered counts, so
    no collective is needed in the backward pass.
    """

    kind = "margin"

    def __init__(self, alpha: float = 0.2, beta_init: float = 1.2, nu: float = 0.0, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None) -> None:
        super().__init__(rank, world_size)
        if not alpha > 0:
            raise ValueError(f"loss.margin_alpha must be > 0, got {alpha}")
        if not 0 < beta_init < 2:
            raise ValueError(f"loss.margin_beta_init must be in (0, 2) (distances of unit vectors), got "
                             f"{beta_init}")
        if not nu >= 0:
            raise ValueError(f"loss.margin_nu must be >= 0, got {nu}")
        self.alpha, self.nu = float(alpha), float(nu)
        self.beta = nn.Parameter(torch.full((1,), float(beta_init), device=device))
        # CPU: the same stream on every rank and every device type
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 104_729)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> MarginObjective:
        loss = cfg.loss
        return cls(loss.margin_alpha, loss.margin_beta_init, loss.margin_nu, seed=cfg.runtime.seed, rank=rank,
                   world_size=world_size, device=device)

    def _uniforms(self, batch: GlobalBatch) -> torch.Tensor:
        """This rank's share of one uniform number per ordered anchor-positive pair of the global batch."""
        _, inverse, counts = torch.unique(batch.labels, return_inverse=True, return_counts=True)
        pairs_per_row = (counts[inverse] - 1).cpu()
        first = int(pairs_per_row[:batch.start].sum())
        mine = int(pairs_per_row[batch.start:batch.start + batch.num_rows].sum())
        uniforms = torch.rand(int(pairs_per_row.sum()), generator=self.generator, dtype=torch.float64)
        return uniforms[first:first + mine].to(batch.rows.device)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = gather_global_batch(embeddings, labels, normalize=True)
        dist = euclidean(batch.squared_distances())
        positive, negative = batch.masks()
        anchors, positives = positive.nonzero(as_tuple=True)
        uniforms = self._uniforms(batch)
        keep = negative[anchors].any(dim=1)
        anchors, positives, uniforms = anchors[keep], positives[keep], uniforms[keep]
        probabilities = distance_weighted_probabilities(dist, negative, embeddings.shape[1])
        negatives = sample_by_inverse_cdf(probabilities[anchors], uniforms)
        self.last_triplets = torch.stack([anchors + batch.start, positives, negatives], dim=1)

        # beta enters the terms as a constant; its (global) gradient is added explicitly below
        beta = self.beta.detach().to(dist.dtype)
        positive_terms = (self.alpha + dist[anchors, positives] - beta).clamp(min=0.0)
        negative_terms = (self.alpha + beta - dist[anchors, negatives]).clamp(min=0.0)
        term_sum = positive_terms.sum() + negative_terms.sum()
        local = torch.stack([term_sum.detach(), (positive_terms > 0).sum().to(dist.dtype),
                             (negative_terms > 0).sum().to(dist.dtype),
                             dist.new_tensor(float(anchors.numel()))])
        total_sum, active_positive, active_negative, num_triplets = global_sums(local)
        active = active_positive + active_negative
        has_triplets = float(num_triplets > 0)
        beta_gradient = (_ratio(active_negative - active_positive, active) + self.nu) * has_triplets
        beta_term = (self.beta - self.beta.detach()).to(dist.dtype).sum() * beta_gradient.to(dist.dtype)
        partial = term_sum / active.clamp(min=1.0).to(dist.dtype) + beta_term + batch.graph_zero()
        beta_value = self.beta.detach().to(torch.float64).sum()
        value = _ratio(total_sum, active) + self.nu * beta_value * has_triplets
        self._log(positive_pairs=batch.positive_pairs(), triplets=num_triplets,
                  active_pairs=_ratio(active, 2.0 * num_triplets), beta=self.beta.detach().sum())
        return global_loss(partial, value, batch)

    def build_optimizer(self, cfg: Any, lr: float) -> torch.optim.Optimizer:
        """Plain SGD with momentum for beta, no weight decay (decay would pull the boundary towards 0). The
        loop sets a group's lr to ``schedule lr * fc.lr_scale * lr_scale``; this group's ``lr_scale`` makes
        it ``loss.margin_beta_lr`` at the schedule's peak, following the same warmup and decay."""
        beta_lr = cfg.loss.margin_beta_lr
        group = {"params": [self.beta], "lr": beta_lr, "lr_scale": beta_lr / (lr * cfg.fc.lr_scale)}
        return torch.optim.SGD([group], lr=beta_lr, momentum=cfg.optim.momentum, weight_decay=0.0)

    def checkpoint_files(self, rank: int, world_size: int) -> list[str]:
        return [MARGIN_STATE_FILE] if rank == 0 else []

    def save(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> None:
        # Replicated state (beta, its optimiser, the sampling generator): rank 0 writes it for everyone.
        if self.rank != 0:
            return
        import os

        state = {"beta": self.beta.detach().cpu(), "generator": self.generator.get_state(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None}
        path = Path(directory) / MARGIN_STATE_FILE
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> bool:
        from arcface.checkpoint import CheckpointError

        path = Path(directory) / MARGIN_STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the training checkpoint (was it saved with "
                                  "loss.kind = 'margin'?)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            beta, generator_state = state["beta"], state["generator"]
        except Exception as exc:  # truncated / corrupted / another layout
            raise CheckpointError(f"{path}: cannot load the margin objective's state ({exc})") from exc
        if beta.shape != self.beta.shape:
            raise CheckpointError(f"{path}: beta has shape {tuple(beta.shape)}, expected "
                                  f"{tuple(self.beta.shape)}")
        with torch.no_grad():
            self.beta.copy_(beta)
        self.generator.set_state(generator_state)
        if optimizer is not None and state.get("optimizer") is not None:
            # lr_scale depends on this run's base lr (world size, config): keep it, take the momentum
            lr_scales = [group["lr_scale"] for group in optimizer.param_groups]
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{path}: does not fit beta's optimiser ({exc})") from exc
            for group, lr_scale in zip(optimizer.param_groups, lr_scales):
                group["lr_scale"] = lr_scale
        return False  # replicated: the same file serves any world size

    def describe(self) -> str:
        return (f"margin loss with distance-weighted sampling over the global batch, alpha {self.alpha:g}, "
                f"learnable beta (now {float(self.beta.detach().sum()):.4g}), nu {self.nu:g} "
                "(needs several images per identity in each global batch)")
