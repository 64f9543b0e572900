"""Softmax + center loss (Wen et al. 2016), ``loss.kind = "softmax+center"``, with the class centres sharded
by class exactly like the Partial FC classifier.

The objective is ``L = L_softmax + lambda * L_center`` over the global batch of ``B`` samples::

    L_softmax  the sharded Partial FC softmax of arcface.objectives.margin_softmax (loss.head,
               loss.margin, fc.sample_rate as there; the paper's plain softmax W x is
               loss.head = "lsoftmax" with loss.lsoftmax_margin = 1)
    L_center = 1/2 * 1/B * sum_i ||x_i - c_{y_i}||^2        (x_i L2-normalised with loss.center_normalize)
    lambda   = loss.center_weight

The centres are not trained by the optimiser from the loss's gradient; they follow the paper's rule,
once per optimiser update, over the samples of that update (all micro-batches of all ranks)::

    delta c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),   c_j <- c_j - alpha * delta c_j
    (n_j = samples of class j in the update, alpha = loss.center_lr; classes not in it do not move)

so the loss's gradient flows to the embeddings only (``lambda (x_i - c_{y_i}) / B``).

Sharding: rank ``r`` owns the centres of the classes of its FC shard (:class:`arcface.head.partition.
ClassPartition`), a ``[num_local, D]`` table next to the FC rows (the same memory again: 4 bytes per
class and dimension). A step all-gathers the embeddings (autograd-aware: the backward reduce-scatters
the gradient) and the labels; each rank computes the residuals of the rows whose class it owns, the
partial sums of the loss are summed over ranks (the value is the same on every rank), and each rank
updates only its own centres. The centres are saved inside the FC shard files and resharded with them
by class range (:mod:`arcface.head.shard_checkpoint`), so a run resumes on any number of processes. Their
update has no state of its own (no momentum), so the centres are everything there is to save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from arcface.distributed import all_gather_autograd, all_gather_tensor, get_world_size
from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.objectives import Objective, register_objective
from arcface.objectives.margin_softmax import build_fc_optimizer_from_config, build_partial_fc

__all__ = ["ShardedCenters", "CenterLossOptimizer", "SoftmaxCenterObjective"]


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's partial value (an all-reduce; identical on every rank). Backward:
    the incoming gradient goes to this rank's partial unchanged; the collective that brought the other
    ranks' rows here (an autograd all-gather) adds their contributions up in its own backward."""

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = partial.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_output


class ShardedCenters(nn.Module):
    """This rank's class centres and the center-loss term of the global batch (module docstring).

    Args:
        partition: the classes this rank owns (the FC shard's partition).
        embedding_size: ``D``.
        alpha: the centre learning rate of the paper's rule (``loss.center_lr``).
        normalize: the term on L2-normalised embeddings (``loss.center_normalize``).
        device, dtype: of the centre table (zeros at the start: the same for every world size).

    :meth:`forward` returns ``1/2 * mean_i ||x_i - c_{y_i}||^2`` over the global batch and, in training
    mode, remembers ``(class, c_j - x_i)`` of the rows this rank owns; :meth:`apply_update` moves the
    centres by the paper's rule over everything remembered since the last :meth:`discard_update`.
    """

    def __init__(self, partition: ClassPartition, embedding_size: int, alpha: float, normalize: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if partition.world_size != get_world_size():
            raise ValueError(f"ClassPartition.world_size ({partition.world_size}) differs from the process "
                             f"group's world size ({get_world_size()})")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"loss.center_lr must be in (0, 1], got {alpha}")
        self.partition = partition
        self.embedding_size = int(embedding_size)
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.register_buffer("centers", torch.zeros(partition.num_local, embedding_size, dtype=dtype,
                                                    device=device))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def extra_repr(self) -> str:
        p = self.partition
        return (f"classes=[{p.class_start}, {p.class_end}) of {p.num_classes}, embedding_size="
                f"{self.embedding_size}, alpha={self.alpha}, normalize={self.normalize}")

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """``local_embeddings [b, D]`` and global class ids ``local_labels [b]`` of this rank (every rank
        the same ``b``) -> the 0-dim center term of the global batch, the same on every rank."""
        device = self.centers.device
        labels = local_labels.to(device=device, dtype=torch.long)
        distributed = self.partition.world_size > 1
        with torch.autocast(device_type=device.type, enabled=False):
            x = local_embeddings.to(device=device, dtype=self.centers.dtype)
            if self.normalize:
                x = F.normalize(x, dim=1)
            if distributed:
                total, total_labels = all_gather_autograd(x), all_gather_tensor(labels)
            else:
                total, total_labels = x, labels
            rows = self.partition.to_local(total_labels)
            owned = (rows >= 0).nonzero().squeeze(1)
            mine = rows.index_select(0, owned)
            residual = total.index_select(0, owned) - self.centers.index_select(0, mine)
            partial = 0.5 * residual.pow(2).sum() / total.shape[0]
            loss = _SumOverRanks.apply(partial) if distributed else partial
            if self.training:
                self._pending.append((mine, residual.detach().neg()))  # c_j - x_i
            return loss

    @torch.no_grad()
    def apply_update(self) -> None:
        """``c_j -= alpha * sum_i (c_j - x_i) / (1 + n_j)`` over the remembered rows; then forget them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        rows = torch.cat([r for r, _ in pending])
        if rows.numel() == 0:
            return
        deltas = torch.cat([d for _, d in pending])
        classes, inverse = torch.unique(rows, return_inverse=True)
        sums = deltas.new_zeros(classes.numel(), deltas.shape[1]).index_add_(0, inverse, deltas)
        counts = deltas.new_zeros(classes.numel()).index_add_(0, inverse, torch.ones_like(inverse,
                                                                                       dtype=deltas.dtype))
        self.centers.index_add_(0, classes, sums.mul_((-self.alpha / (1.0 + counts)).unsqueeze(1)))

    def discard_update(self) -> None:
        """Forget the remembered rows (an update that was skipped)."""
        self._pending = []


class CenterLossOptimizer(torch.optim.Optimizer):
    """The FC shard's row optimiser with the centre rule attached.

    It shares the FC optimiser's ``param_groups`` and ``state`` (the trainer's learning-rate schedule and
    the grad scaler see the FC rows as usual). :meth:`step` steps the FC rows and then moves the centres
    over the samples of every forward since the last :meth:`zero_grad`; :meth:`zero_grad` also drops
    those samples, so an update the trainer skips (non-finite loss, fp16 overflow) leaves the centres
    unchanged.
    """

    def __init__(self, fc_optimizer: torch.optim.Optimizer, centers: ShardedCenters) -> None:
        super().__init__([p for group in fc_optimizer.param_groups for p in group["params"]],
                         dict(fc_optimizer.defaults))
        self.fc_optimizer = fc_optimizer
        self.centers = centers
        self.param_groups = fc_optimizer.param_groups
        self.state = fc_optimizer.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = self.fc_optimizer.step(closure)
        self.centers.apply_update()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.fc_optimizer.zero_grad(set_to_none=set_to_none)
        self.centers.discard_update()


@register_objective
class SoftmaxCenterObjective(Objective):
    """``softmax + lambda * center`` with the softmax over the sharded Partial FC and the centres sharded
    the same way (module docstring)."""

    kind = "softmax+center"

    def __init__(self, pfc: PartialFC, centers: ShardedCenters, center_weight: float) -> None:
        super().__init__()
        if center_weight < 0:
            raise ValueError(f"loss.center_weight must be >= 0, got {center_weight}")
        self.pfc = pfc
        self.centers = centers
        self.center_weight = float(center_weight)
        self._last: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, rank: int, world_size: int,
                    device: torch.device) -> SoftmaxCenterObjective:
        pfc = build_partial_fc(cfg, num_classes, rank, world_size, device)
        centers = ShardedCenters(pfc.partition, cfg.backbone.embedding_size, cfg.loss.center_lr,
                                 normalize=cfg.loss.center_normalize, device=device)
        return cls(pfc, centers, cfg.loss.center_weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        softmax = self.pfc(embeddings, labels)
        center = self.centers(embeddings, labels)
        self._last = torch.stack([softmax.detach(), center.detach()])
        return softmax + self.center_weight * center

    def build_optimizer(self, cfg: Any, lr: float) -> CenterLossOptimizer:
        return CenterLossOptimizer(build_fc_optimizer_from_config(self.pfc, cfg, lr), self.centers)

    def checkpoint_files(self, rank: int, world_size: int) -> list[str]:
        from arcface.head.shard_checkpoint import shard_filename

        return [shard_filename(rank, world_size)]

    @staticmethod
    def _fc_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
        return optimizer.fc_optimizer if isinstance(optimizer, CenterLossOptimizer) else optimizer

    def save(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> None:
        from arcface.head.shard_checkpoint import save_fc_shard

        save_fc_shard(directory, self.pfc, self._fc_optimizer(optimizer),
                      extra_rows={"centers": self.centers.centers})

    def load(self, directory: Path, optimizer: torch.optim.Optimizer | None) -> bool:
        from arcface.head.shard_checkpoint import list_fc_shards, load_fc_resharded

        list_fc_shards(directory)  # a clear error when a rank's shard is missing
        info = load_fc_resharded(directory, self.pfc, self._fc_optimizer(optimizer),
                                 extra_rows={"centers": self.centers.centers})
        return bool(info["resharded"])

    def log_values(self) -> dict[str, float]:
        if self._last is None:
            return {}
        softmax, center = self._last.tolist()
        return {"softmax": softmax, "center": center}

    def describe(self) -> str:
        return (f"softmax ({type(self.pfc.margin).__name__}) + {self.center_weight:g} x center loss (centre "
                f"lr {self.centers.alpha:g}{', normalised embeddings' if self.centers.normalize else ''}), "
                f"FC rows and centres on this rank {self.pfc.partition.num_local} (sampled "
                f"{self.pfc.num_sample})")
