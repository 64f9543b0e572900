"""Backbone optimiser and learning-rate schedules.

The schedule is a pure function of the optimiser step (:func:`lr_at`): no scheduler object carries
state, so resuming needs only the step counter, and the value at any step can be checked by hand.

Step semantics: ``step`` counts optimiser **updates** already taken (0 for the first update). With
gradient accumulation (``optim.accumulation_steps = k``) the loop calls :func:`lr_at` and :func:`set_lr`
once per update, i.e. once every ``k`` micro-batches, never per micro-batch; ``total_steps`` and the
warmup are in updates too (see ``TrainConfig.total_steps``).

Shape of the schedule (``W`` warmup updates, ``T`` total updates, ``lr0`` the base LR, usually
``cfg.scaled_lr(world_size)``):

* warmup, ``step < W``: ``lr0 * (step + 1) / W`` — starts near zero, reaches ``lr0`` at the last
  warmup update;
* then with progress ``p = (step - W) / (T - W)`` clamped to ``[0, 1]``:

  * ``polynomial``: ``min_lr + (lr0 - min_lr) * (1 - p) ** power``;
  * ``cosine``: ``min_lr + (lr0 - min_lr) * (1 + cos(pi * p)) / 2``;
  * ``step``: ``max(min_lr, lr0 * gamma ** n)``, ``n`` = number of milestones (converted to updates)
    ``<= step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from arcface.config import ScheduleConfig, TrainConfig

__all__ = ["build_backbone_optimizer", "param_groups", "lr_at", "set_lr", "schedule_for"]

# Modules whose parameters are scale/shift-like and usually excluded from weight decay: decaying a BN
# scale or a PReLU slope towards 0 changes the function's shape rather than regularising its size.
_NO_DECAY_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.PReLU)


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias_prelu: bool) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and (optionally) a no-decay group.

    Frozen parameters (``requires_grad=False``, e.g. the E head's fixed BN scale) are left out. Each
    parameter appears once even when modules share it.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        exempt_module = isinstance(module, _NO_DECAY_MODULES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = no_decay_bn_bias_prelu and (exempt_module or name == "bias")
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
    return groups


def build_backbone_optimizer(cfg: TrainConfig, model: nn.Module,
                             lr: float | None = None) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the backbone's trainable parameters, per ``cfg.optim``.

    ``lr`` is only the initial value (default ``cfg.optim.lr``): the loop sets the scheduled LR before
    every update with :func:`set_lr`. A DDP-wrapped model works as is (its ``modules()`` include the
    wrapped network's).
    """
    optim = cfg.optim
    groups = param_groups(model, optim.weight_decay, optim.no_decay_bn_bias_prelu)
    if not any(group["params"] for group in groups):
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    lr = optim.lr if lr is None else lr
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                                 weight_decay=optim.weight_decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {optim.name!r}")  # config validates this


def schedule_for(cfg: TrainConfig, num_images: int, world_size: int) -> dict[str, Any]:
    """The resolved schedule of a run: base LR, total/warmup updates, milestones (for logs and checks)."""
    return {
        "name": cfg.schedule.name,
        "base_lr": cfg.scaled_lr(world_size),
        "total_steps": cfg.total_steps(num_images, world_size),
        "warmup_steps": cfg.warmup_steps(num_images, world_size),
        "steps_per_epoch": cfg.steps_per_epoch(num_images, world_size),
        "milestone_steps": cfg.milestone_steps(num_images, world_size) if cfg.schedule.milestones else [],
    }


def lr_at(step: int, cfg: TrainConfig | ScheduleConfig, total_steps: int, base_lr: float, *,
          steps_per_epoch: float | None = None) -> float:
    """The learning rate of optimiser update ``step`` (0-based), a pure function (see module docstring).

    ``cfg`` is the run's config or its ``schedule`` section. Epoch-valued settings (``warmup_epochs``,
    ``milestones``) are converted with ``steps_per_epoch``, by default ``total_steps / schedule.epochs``
    (exact when the run length comes from epochs; pass it explicitly when ``schedule.total_steps`` is set).
    """
    sched = cfg.schedule if isinstance(cfg, TrainConfig) else cfg
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    per_epoch = total_steps / sched.epochs if steps_per_epoch is None else float(steps_per_epoch)
    warmup = sched.warmup_steps if sched.warmup_steps > 0 else int(round(sched.warmup_epochs * per_epoch))
    if warmup >= total_steps:
        raise ValueError(f"schedule warmup ({warmup} updates) must be shorter than the run "
                         f"({total_steps} updates)")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched.name == "step":
        milestones = [int(round(m * per_epoch)) for m in sched.milestones]
        drops = sum(1 for m in milestones if step >= m)
        return max(sched.min_lr, base_lr * sched.gamma ** drops)
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    if sched.name == "polynomial":
        factor = (1.0 - progress) ** sched.power
    elif sched.name == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule.name must be 'polynomial', 'cosine' or 'step', got {sched.name!r}")
    return sched.min_lr + (base_lr - sched.min_lr) * factor


def set_lr(optimizers: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer | None]
           | Sequence[torch.optim.Optimizer | None], lr: float, fc_lr_scale: float = 1.0) -> None:
    """Set the learning rate of every param group: ``lr`` for the backbone, ``lr * fc_lr_scale`` for the FC.

    ``optimizers`` is the backbone optimiser alone, a sequence ``(backbone, fc, ...)`` (everything after
    the first is FC), or a mapping whose key ``"backbone"`` is the backbone and every other key FC.
    ``None`` entries are skipped. A group may carry its own ``"lr_scale"`` multiplier.
    """
    pairs: Iterable[tuple[torch.optim.Optimizer | None, float]]
    if isinstance(optimizers, torch.optim.Optimizer):
        pairs = [(optimizers, 1.0)]
    elif isinstance(optimizers, Mapping):
        pairs = [(opt, 1.0 if key == "backbone" else fc_lr_scale) for key, opt in optimizers.items()]
    else:
        pairs = [(opt, 1.0 if index == 0 else fc_lr_scale) for index, opt in enumerate(optimizers)]
    for optimizer, scale in pairs:
        if optimizer is None:
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr * scale * group.get("lr_scale", 1.0)
