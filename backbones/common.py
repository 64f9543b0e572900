"""Layers and helpers shared by the backbones (single-device code)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Stop BatchNorm layers under ``module`` from updating running statistics.

    Gradient checkpointing runs a stage's forward a second time during backward. Batch statistics
    (what training-mode BN normalises with) are recomputed identically, but without this the running
    mean/var and ``num_batches_tracked`` would be updated twice per step, so an eval-mode network
    trained with checkpointing would differ from one trained without.
    """
    # Momentum 0 rather than track_running_stats=False: the recompute must save exactly the tensors
    # the original forward saved, so only the update factor may change.
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, (momentum, tracked) in zip(layers, saved):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)


def run_stage(stage: nn.Module, x: torch.Tensor, gradient_checkpointing: bool) -> torch.Tensor:
    """Apply ``stage``, recomputing its activations in backward when checkpointing is on (training
    with autograd only); the recompute leaves BN running statistics untouched."""
    if gradient_checkpointing and stage.training and torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            # Dynamo does not trace a custom context_fn; under compile the recompute is planned by the
            # graph partitioner on functionalised code, where buffer updates happen once anyway.
            return checkpoint(stage, x, use_reentrant=False)
        return checkpoint(stage, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _frozen_batchnorm_stats(stage)))
    return stage(x)
