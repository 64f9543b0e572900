"""Model-parallel, sampled "Partial FC" classifier with a distributed softmax cross-entropy.

Each rank owns the fp32 centres of its contiguous block of classes (:class:`ClassPartition`). A step:

1. all-gather the embeddings of every rank (PyTorch's autograd-aware functional collective: its
   backward reduce-scatters the gradient, one collective) and the labels;
2. Partial FC sampling (``sample_rate < 1``): keep every class of this shard that is a positive of the
   global batch, add negatives drawn uniformly at random (seeded generator) up to
   ``floor(sample_rate * num_local)`` rows, remap the labels to the sampled columns;
3. cosine logits ``normalize(embeddings) @ normalize(sampled_weight).T`` in fp32
   (:func:`arcface.head.cosine_logits.cosine_logits`: the rows are gathered once and that buffer becomes
   their gradient, a sparse COO tensor of the sampled rows for the sparse update);
4. the margin module on the local columns (label ``-1`` where the target is on another rank);
5. distributed softmax cross-entropy: max all-reduce, sum all-reduce, exact log-sum-exp loss.

The returned loss is the mean over the GLOBAL batch and is identical on every rank; the gradient each
rank receives for its local embeddings is exactly the gradient of that loss (the dense single-process
gradient). **Gradient-scaling contract with DDP**: DDP averages backbone gradients over the ``W``
ranks, so the trainer must put ``arcface.distributed.scale_gradient(embeddings, world_size)`` between
the DDP backbone and this module; then backbone gradients equal the dense single-process ones.

Memory per rank (fp32, ``D`` = embedding size, ``B`` = global batch, ``k`` = sampled rows of the shard
= ``max(floor(rate * num_local), positives here)``; a sum of parts, so an upper bound)::

    weights          4 * num_local * D
    optimizer state  SGD: 4 * num_local * D (momentum) + 8 * k * D (sparse update: 2 reused row buffers)
                     AdamW: 8 * num_local * D + 4 * num_local (+ 16 * k * D: 4 row buffers, sparse)
    gradient         4 * num_local * D  (dense update, or rate 1)
                     (4 * D + 8) * k    (sparse update: the gathered rows become the gradient values)
    activations      4 * k * D (gathered rows, dense update with rate < 1 only)
                     + 12 * B * k (cos_theta, softmax, the logits' gradient) + 8 * B * D (embeddings)
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from arcface.distributed import all_gather_autograd, all_gather_tensor, get_world_size, is_distributed
from arcface.head.cosine_logits import cosine_logits
from arcface.head.partition import ClassPartition
from arcface.head.row_optim import build_fc_optimizer

__all__ = ["PartialFC", "DistributedCrossEntropy", "distributed_cross_entropy", "init_fc_weight",
           "partial_fc_memory_bytes", "sampled_rows_count"]

_INIT_BLOCK_ROWS = 1 << 16


def init_fc_weight(partition: ClassPartition, embedding_size: int, seed: int, std: float = 0.01,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """This rank's rows of a ``N(0, std^2)`` matrix ``[num_classes, D]`` that does not depend on W.

    Rows are generated in fixed blocks of 65536 classes, each from its own seeded generator, so the
    global matrix is the same for any world size (a run on 2 ranks starts exactly like one on 1) while
    no rank ever materialises more than one block per thread beyond its shard. The values are drawn on
    the CPU (the same numbers on every device), blocks in parallel threads (a 10M-class shard is 150
    blocks of ~0.2 s each), and each block is copied to ``device`` as it is made, so a GPU shard of tens
    of GB never exists in host memory.
    """
    weight = torch.empty(partition.num_local, embedding_size, dtype=torch.float32, device=device)
    if partition.num_local == 0:
        return weight
    first_block = partition.class_start // _INIT_BLOCK_ROWS
    last_block = (partition.class_end - 1) // _INIT_BLOCK_ROWS

    def fill(block: int) -> None:
        block_start = block * _INIT_BLOCK_ROWS
        block_rows = min(_INIT_BLOCK_ROWS, partition.num_classes - block_start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(block_rows, embedding_size, generator=generator).mul_(std)
        lo = max(partition.class_start, block_start)
        hi = min(partition.class_end, block_start + block_rows)
        start = partition.class_start
        weight[lo - start:hi - start] = values[lo - block_start:hi - block_start]

    blocks = range(first_block, last_block + 1)
    threads = min(len(blocks), os.cpu_count() or 1, 16)
    if threads <= 1:
        for block in blocks:
            fill(block)
    else:  # each block owns its generator: the values do not depend on the order or the thread
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, blocks))
    return weight


class DistributedCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes sharded across ranks; mean over the rows of ``logits``.

    Hand-written rather than composed from an autograd-aware ``all_reduce``: that
    collective's backward SUMS the incoming gradient over ranks, which is right when every rank holds
    a different term of the objective, but our loss value is replicated on every rank, so it would
    multiply the logits' gradient by W. The exact gradient ``(softmax - onehot) / B`` is local to each
    rank, so the backward here needs no communication at all.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, local_targets: torch.Tensor,  # type: ignore[override]
                distributed: bool) -> torch.Tensor:
        batch = logits.shape[0]
        if logits.shape[1] > 0:
            row_max = logits.detach().amax(dim=1)
        else:
            row_max = torch.full((batch,), -math.inf, dtype=logits.dtype, device=logits.device)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        probs = (logits.detach() - row_max.unsqueeze(1)).exp_()
        owned = local_targets >= 0
        owned_rows = owned.nonzero().squeeze(1)
        # [B, 2]: per row, the sum of exp over this shard's columns and the shifted target logit if the
        # target lives here (0 elsewhere); one SUM all-reduce completes both.
        stats = torch.zeros(batch, 2, dtype=logits.dtype, device=logits.device)
        stats[:, 0] = probs.sum(dim=1)
        stats[owned_rows, 1] = logits.detach()[owned_rows, local_targets[owned_rows]] - row_max[owned_rows]
        if distributed:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        sum_exp, target_shifted = stats[:, 0], stats[:, 1]
        probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(probs, local_targets, owned_rows)
        return (sum_exp.log() - target_shifted).mean()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        probs, local_targets, owned_rows = ctx.saved_tensors
        # The saved softmax is consumed in place: the graph is freed after one backward anyway.
        grad = probs
        grad[owned_rows, local_targets[owned_rows]] -= 1.0
        grad.mul_(grad_output / probs.shape[0])
        return grad, None, None


def distributed_cross_entropy(logits: torch.Tensor, local_targets: torch.Tensor,
                              distributed: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy over rows; columns of ``logits`` are this rank's classes, ``local_targets``
    the target column or ``-1`` when the target class lives on another rank. Identical on all ranks."""
    if distributed is None:
        distributed = get_world_size() > 1
    return DistributedCrossEntropy.apply(logits, local_targets, distributed)


class PartialFC(nn.Module):
    """The sharded (and optionally sampled) classifier + margin + distributed softmax loss.

    Args:
        partition: which classes this rank owns (``partition.world_size`` must equal the process
            group's size; 1 without a process group).
        embedding_size: ``D``.
        margin: module ``(cos_theta [b, n], labels [b] column or -1) -> logits [b, n]``
            (``arcface.head.margins.CombinedMargin`` and friends); applied to the local sampled columns.
            A head that computes its logits itself from the embeddings and the weight (class attribute
            ``computes_logits = True``, e.g. ``arcface.head.lsoftmax.LSoftmaxHead``: unnormalised ``W x``)
            is called as ``margin(total_embeddings, weight, rows, targets, grad_layout)`` instead of
            receiving cosines.
        sample_rate: fraction of the shard's classes used per step, in (0, 1]; 1 = plain model parallel.
        update: ``"sparse"``: with ``sample_rate < 1`` the weight receives a sparse row gradient and the
            optimiser (from :meth:`build_optimizer`) touches only sampled rows; ``"dense"``: a dense
            gradient of the whole shard (zero in unsampled rows), so weight decay and momentum move
            every row each step, like a plain ``torch.optim`` optimiser.
        device: where the shard lives (CPU by default; pass the rank's CUDA device explicitly).
        seed: initialisation seed (the global matrix is the same for any world size) and sampling seed
            (per rank: ``seed``, ``rank`` and the step decide the negatives).
        init_std: standard deviation of the initial centres.
        check_labels: validate label range every step (one host sync).
    """

    def __init__(self, partition: ClassPartition, embedding_size: int, margin: nn.Module,
                 sample_rate: float = 1.0, update: str = "sparse", device: torch.device | str | None = None,
                 seed: int = 0, init_std: float = 0.01, check_labels: bool = True) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"backbone.embedding_size must be >= 1, got {embedding_size}")
        if partition.world_size != get_world_size():
            raise ValueError(f"ClassPartition.world_size ({partition.world_size}) differs from the process "
                             f"group's world size ({get_world_size()})")
        if is_distributed() and partition.rank != dist.get_rank():
            raise ValueError(f"ClassPartition.rank ({partition.rank}) differs from this process's rank "
                             f"({dist.get_rank()})")
        self.partition = partition
        self.embedding_size = embedding_size
        self.margin = margin
        self.seed = seed
        self.check_labels = check_labels
        self.weight = nn.Parameter(init_fc_weight(partition, embedding_size, seed, init_std, device))
        self.set_sampling(sample_rate, update)
        # Seeded per rank so that runs are reproducible; its state is saved with the FC shard.
        self.generator = torch.Generator(device=self.weight.device)
        self.generator.manual_seed(seed * 1_000_003 + 7919 * partition.rank + 1)
        #: local rows used in the last forward (sorted), for inspection and tests.
        self.sampled_rows: torch.Tensor | None = None

    def set_sampling(self, sample_rate: float, update: str) -> None:
        """(Re)configure the sample rate and update mode; the shard and the sampler RNG are kept."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"fc.sample_rate must be in (0, 1], got {sample_rate}")
        if update not in ("sparse", "dense"):
            raise ValueError(f"fc.update must be 'sparse' or 'dense', got {update!r}")
        self.sample_rate = float(sample_rate)
        self.update = update
        self.num_sample = sampled_rows_count(self.sample_rate, self.partition.num_local)

    @property
    def sampling(self) -> bool:
        return self.num_sample < self.partition.num_local

    def extra_repr(self) -> str:
        p = self.partition
        return (f"classes=[{p.class_start}, {p.class_end}) of {p.num_classes}, rank={p.rank}/{p.world_size}, "
                f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}, update={self.update}")

    @torch.no_grad()
    def sample(self, local_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose this step's rows: all positives here + uniform random negatives.

        Returns ``(rows, targets)``: sorted local row indices ``[k]`` and the targets remapped to
        columns of the sampled matrix (``-1`` stays ``-1``). The random scores cost O(num_local)
        scalars per step (no embedding-size factor); everything of size ``D`` is O(k).
        """
        positives = torch.unique(local_targets[local_targets >= 0])
        if positives.numel() >= self.num_sample:
            rows = positives
        else:
            scores = torch.rand(self.partition.num_local, generator=self.generator,
                                device=local_targets.device)
            scores[positives] = 2.0  # above any uniform draw: positives are always kept
            rows = torch.topk(scores, self.num_sample, sorted=False).indices.sort().values
        targets = torch.where(local_targets >= 0, torch.searchsorted(rows, local_targets.clamp(min=0)),
                              local_targets)
        return rows, targets

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean ArcFace-family cross-entropy over the global batch (0-dim fp32, same on every rank).

        ``local_embeddings [b, D]`` (any float dtype; cast to the weight's dtype, fp32 unless the module
        was converted, e.g. to fp64 for reference checks) and ``local_labels [b]`` global class ids of
        this rank's samples; every rank must pass the same ``b``.
        """
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"PartialFC expects embeddings [batch, {self.embedding_size}], "
                             f"got {tuple(local_embeddings.shape)}")
        if local_labels.shape != local_embeddings.shape[:1]:
            raise ValueError(f"PartialFC expects labels [{local_embeddings.shape[0]}], "
                             f"got {tuple(local_labels.shape)}")
        device = self.weight.device
        local_labels = local_labels.to(device=device, dtype=torch.long)
        if self.check_labels:
            invalid = (local_labels < 0) | (local_labels >= self.partition.num_classes)
            if bool(invalid.any()):
                bad = local_labels[invalid][:5].tolist()
                raise ValueError(f"labels must be in [0, {self.partition.num_classes}), got e.g. {bad}")
        distributed = self.partition.world_size > 1
        # Sampling, margin and loss run in fp32 even under fp16/bf16 autocast of the backbone.
        with torch.autocast(device_type=device.type, enabled=False):
            embeddings = local_embeddings.to(device=device, dtype=self.weight.dtype)
            if distributed:
                total_embeddings = all_gather_autograd(embeddings)
                total_labels = all_gather_tensor(local_labels)
            else:
                total_embeddings, total_labels = embeddings, local_labels
            local_targets = self.partition.to_local(total_labels)
            if self.sampling:
                rows, targets = self.sample(local_targets)
            else:
                rows, targets = None, local_targets
            self.sampled_rows = rows
            # Sparse update: only the sampled rows get a gradient (a COO tensor, never [num_local, D]).
            grad_layout = "sparse" if self.update == "sparse" else "dense"
            if getattr(self.margin, "computes_logits", False):
                logits = self.margin(total_embeddings, self.weight, rows, targets, grad_layout)
            else:
                cos_theta = cosine_logits(total_embeddings, self.weight, rows, grad_layout=grad_layout)
                logits = self.margin(cos_theta, targets, **self._margin_inputs(total_embeddings, cos_theta,
                                                                              targets, distributed))
            return distributed_cross_entropy(logits.to(self.weight.dtype), targets, distributed)

    def _margin_inputs(self, total_embeddings: torch.Tensor, cos_theta: torch.Tensor, targets: torch.Tensor,
                       distributed: bool) -> dict[str, torch.Tensor]:
        """Global per-row statistics some margins need (see arcface.head.margins): AdaFace's embedding norms
        (every rank has all of them after the all-gather) and CurricularFace's per-row target cosine,
        which lives on the target's owner only and is summed across ranks (zeros elsewhere)."""
        inputs: dict[str, torch.Tensor] = {}
        if getattr(self.margin, "needs_embedding_norms", False):
            inputs["embedding_norms"] = total_embeddings.detach().norm(dim=1)
        if getattr(self.margin, "needs_row_target_cos", False):
            has_target = targets >= 0
            local = cos_theta.detach().gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
            row_target_cos = torch.where(has_target, local, torch.zeros_like(local))
            if distributed:
                dist.all_reduce(row_target_cos)
            inputs["row_target_cos"] = row_target_cos
        return inputs

    def sampled_classes(self) -> torch.Tensor:
        """Global class ids of the rows used in the last forward (all of the shard without sampling)."""
        if self.sampled_rows is None:
            p = self.partition
            return torch.arange(p.class_start, p.class_end, device=self.weight.device)
        return self.sampled_rows + self.partition.class_start

    def build_optimizer(self, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                        weight_decay: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
                        eps: float = 1e-8) -> torch.optim.Optimizer:
        """The row-wise optimiser for this shard: ``"sgd"`` (RowSGD) or ``"adamw"`` (RowAdamW).

        With ``update="sparse"`` and sampling it updates only the sampled rows and their state.
        """
        return build_fc_optimizer([self.weight], name, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  betas=betas, eps=eps)

    def memory_bytes(self, global_batch: int, optimizer: str = "sgd") -> dict[str, int]:
        """The documented per-rank memory formula (bytes) of this shard: :func:`partial_fc_memory_bytes`."""
        return partial_fc_memory_bytes(self.partition.num_local, self.embedding_size, self.sample_rate,
                                       self.update, global_batch, optimizer)


def sampled_rows_count(sample_rate: float, num_local: int) -> int:
    """Rows a shard of ``num_local`` classes samples per step: ``floor(rate * num_local)`` (with a little
    slack for binary fractions such as 0.3 * 10), at least one, at most all."""
    return min(num_local, max(1, int(math.floor(sample_rate * num_local + 1e-6))))


def partial_fc_memory_bytes(num_local: int, embedding_size: int, sample_rate: float, update: str,
                            global_batch: int, optimizer: str = "sgd") -> dict[str, int]:
    """The documented per-rank memory formula (bytes) of a shard of ``num_local`` classes (module
    docstring), by part; the benchmark checks measurements against it and sizes the largest shard.

    A sum of parts, so an upper bound: the optimiser's per-step row buffers exist only after the
    activations are freed.
    """
    dim, batch = embedding_size, global_batch
    k = sampled_rows_count(sample_rate, num_local)
    sampling = k < num_local
    sampled_update = sampling and update == "sparse"
    if optimizer == "sgd":  # momentum; the sparse step keeps two reusable [k, D] row buffers
        optimizer_bytes = 4 * num_local * dim + (8 * k * dim if sampled_update else 0)
    else:  # exp_avg, exp_avg_sq, per-row step; the sparse step keeps four reusable [k, D] row buffers
        optimizer_bytes = 8 * num_local * dim + 4 * num_local + (16 * k * dim if sampled_update else 0)
    return {
        "weights": 4 * num_local * dim,
        "optimizer": optimizer_bytes,
        # sparse: the gathered, normalised rows become the gradient values (+ int64 row ids)
        "gradient": (4 * dim + 8) * k if sampled_update else 4 * num_local * dim,
        # the gathered rows beside a dense gradient; cos_theta, softmax and the logits' gradient;
        # the gathered embeddings and their normalised copy
        "activations": (4 * k * dim if sampling and not sampled_update else 0) + 12 * batch * k
        + 8 * batch * dim,
    }
