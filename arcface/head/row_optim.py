"""Row-wise optimisers for the Partial FC weight shard: SGD with momentum and AdamW.

Why hand-written: with ``sample_rate < 1`` the shard's gradient is a sparse COO tensor holding only the
rows sampled this step (``PartialFC`` gathers them with ``F.embedding(..., sparse=True)``). PyTorch's
``SGD``/``AdamW`` either reject sparse gradients or would touch every row (weight decay and momentum
decay applied to all ``num_local`` rows: O(C) work and a changed shard everywhere); ``SparseAdam`` has
no weight decay. These optimisers update, for a sparse gradient, ONLY the sampled rows and their state
(momentum / Adam moments, weight decay included), so a step costs O(sampled rows x D). For a dense
gradient (``update="dense"`` or ``sample_rate = 1``) they are exactly torch's SGD / AdamW.

Both are ``torch.optim.Optimizer`` subclasses: the trainer's LR schedule sets
``param_groups[i]["lr"]``, ``state_dict()`` / ``load_state_dict()`` work, and ``GradScaler`` can
unscale and step them.

Update rules (``g`` the gradient row, ``w`` the weight row, only for touched rows when sparse):

* ``RowSGD``:   ``g += wd * w;  buf = momentum * buf + g;  w -= lr * buf``  (torch's SGD, dampening 0;
  the buffer starts at zero, which equals torch's first-step ``buf = g``).
* ``RowAdamW``: ``w *= 1 - lr * wd``; ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``; ``t += 1`` per
  row; ``w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``. The step count ``t`` is kept PER ROW
  (state ``"step"`` of shape ``[num_rows]``) so that a class sampled for the first time at step 1000
  gets the bias correction of its own first update, as a fresh AdamW would give it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["RowSGD", "RowAdamW", "build_fc_optimizer", "ROW_STATE_KEYS"]

# State entries whose first dimension is the weight row (resharded with the rows by fc_checkpoint).
ROW_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")


def _rows_and_values(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique touched rows and their summed gradient rows of a sparse COO gradient.

    ``PartialFC`` emits strictly increasing rows (already coalesced), but autograd's gradient
    accumulation drops the coalesced flag; checking the order costs O(rows) instead of the sort and
    copy of every value row that ``coalesce()`` would do.
    """
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()
        else:
            return rows, grad._values()
    return grad.indices()[0], grad.values()


class _Scratch:
    """Reusable row buffers for the sparse update: a fresh multi-hundred-MB tensor every step costs
    more in page faults than the copy itself on CPU. Kept outside ``state`` (never checkpointed)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``shape`` tensor with ``like``'s dtype and device, from the buffer ``name``."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if (buffer is None or buffer.numel() < size or buffer.dtype != like.dtype
                or buffer.device != like.device):
            buffer = torch.empty(size, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer[:size].view(shape)

    def rows_of(self, name: str, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``source.index_select(0, rows)`` written into the buffer ``name``."""
        out = self.empty(name, (rows.numel(), *source.shape[1:]), source)
        return torch.index_select(source, 0, rows, out=out)


class _RowOptimizer(Optimizer):
    """What both row optimisers share: the checks of ``lr`` and ``weight_decay``, the scratch buffers, and
    the step over every parameter with a gradient; :meth:`_update` is each rule's own."""

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any]) -> None:
        if defaults["lr"] < 0:
            raise ValueError(f"fc optimizer lr must be >= 0, got {defaults['lr']}")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"fc optimizer weight_decay must be >= 0, got {defaults['weight_decay']}")
        super().__init__(params, defaults)
        self._scratch = _Scratch()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:  # pragma: no cover - per rule
        raise NotImplementedError


class RowSGD(_RowOptimizer):
    """SGD with momentum and L2 weight decay that, for sparse gradients, updates only touched rows."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"fc optimizer momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        state = self.state[param]
        if momentum and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        if param.grad.is_sparse:
            # buf = momentum * buf + g + wd * w on the touched rows, then w -= lr * buf.
            rows, grad = _rows_and_values(param.grad)
            weight_rows = self._scratch.rows_of("weight", param, rows) if weight_decay else None
            if momentum:
                step = self._scratch.rows_of("buf", state["momentum_buffer"], rows)
                step.mul_(momentum).add_(grad)
                if weight_rows is not None:
                    step.add_(weight_rows, alpha=weight_decay)
                state["momentum_buffer"].index_copy_(0, rows, step)
            else:
                step = grad if weight_rows is None else grad.add(weight_rows, alpha=weight_decay)
            param.index_add_(0, rows, step, alpha=-lr)
        elif momentum:
            # In place: no temporary the size of the shard (the same update as torch's SGD).
            buf = state["momentum_buffer"].mul_(momentum).add_(param.grad)
            if weight_decay:
                buf.add_(param, alpha=weight_decay)
            param.add_(buf, alpha=-lr)
        else:
            if weight_decay:
                param.mul_(1 - lr * weight_decay)
            param.add_(param.grad, alpha=-lr)


class RowAdamW(_RowOptimizer):
    """AdamW (decoupled weight decay) with per-row step counts; sparse gradients touch only their rows."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"fc optimizer betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"fc optimizer eps must be > 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, weight_decay = group["eps"], group["weight_decay"]
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        if param.grad.is_sparse:
            rows, grad = _rows_and_values(param.grad)
            weight = self._scratch.rows_of("weight", param, rows)
            exp_avg = self._scratch.rows_of("exp_avg", state["exp_avg"], rows)
            exp_avg_sq = self._scratch.rows_of("exp_avg_sq", state["exp_avg_sq"], rows)
            step = state["step"].index_select(0, rows).add_(1)
            denom = self._scratch.empty("denom", tuple(exp_avg_sq.shape), exp_avg_sq)
        else:
            rows, grad, weight = None, param.grad, param
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            step = state["step"].add_(1)
            denom = torch.empty_like(param)
        weight.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Bias corrections per row: [rows, 1] so they broadcast over the embedding dim.
        bias_correction1 = (1 - torch.pow(beta1, step)).unsqueeze(1)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt_().unsqueeze(1)
        # denom = (sqrt(v) / sqrt(1 - b2^t) + eps) * (1 - b1^t), built in one buffer.
        torch.sqrt(exp_avg_sq, out=denom).div_(bias_correction2_sqrt).add_(eps).mul_(bias_correction1)
        weight.addcdiv_(exp_avg, denom, value=-lr)
        if rows is not None:
            param.index_copy_(0, rows, weight)
            state["exp_avg"].index_copy_(0, rows, exp_avg)
            state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
            state["step"].index_copy_(0, rows, step)


def build_fc_optimizer(params: Iterable[torch.Tensor], name: str, lr: float, momentum: float = 0.9,
                       weight_decay: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8) -> Optimizer:
    """``"sgd"`` -> :class:`RowSGD`, ``"adamw"`` -> :class:`RowAdamW` (``momentum`` is SGD's only)."""
    if name == "sgd":
        return RowSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return RowAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"fc.optimizer must be 'sgd' or 'adamw', got {name!r}")
