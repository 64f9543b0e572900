"""``torch.compile`` applied to the backbone from outside: the whole network, or each repeated block.

``runtime.compile_scope = "model"`` wraps the (DDP-wrapped) backbone in one ``torch.compile``: one graph
holds every layer, so compile time grows with depth (r100's 49 residual units are traced, partitioned
into forward and backward and code-generated as one program).

``runtime.compile_scope = "blocks"`` ("regional compilation") compiles each repeated block in place with
``nn.Module.compile``. Dynamo caches compiled code per Python code object, guarded on input shapes and
module attributes, so all units of the same shape share one graph: r100 compiles 8 small graphs (the
first and the other units of each of the 4 stages), not one program of 49 units. The stem and the
embedding head run eagerly. In-place compilation leaves the module tree alone: ``state_dict`` keys, DDP's
parameter order and checkpoints are those of the plain network.

A backbone names its repeated block types in a class attribute ``repeated_blocks`` (metadata only: the
backbone never compiles itself).
"""

from __future__ import annotations

import torch
from torch import nn

from arcface.config import COMPILE_SCOPES

__all__ = ["compile_regions", "compile_backbone"]


def compile_regions(backbone: nn.Module) -> list[nn.Module]:
    """The modules that ``compile_scope = "blocks"`` compiles: every submodule whose type is in the
    backbone's ``repeated_blocks``. Raises ``ValueError`` when the backbone declares none or none is found
    (regional compilation must never quietly compile nothing)."""
    block_types = tuple(getattr(backbone, "repeated_blocks", ()))
    regions = [m for m in backbone.modules() if block_types and isinstance(m, block_types)]
    if not regions:
        raise ValueError(f"runtime.compile_scope = 'blocks': {type(backbone).__name__} declares no repeated "
                         f"block found in it (class attribute repeated_blocks = {block_types!r}); declare "
                         "its block types or use runtime.compile_scope = 'model'")
    return regions


def compile_backbone(model: nn.Module, backbone: nn.Module, scope: str, backend: str) -> nn.Module:
    """The module the training loop calls: ``model`` (the backbone, or the DDP wrapper around it) compiled
    as a whole (``scope = "model"``), or ``model`` itself once the blocks of ``backbone`` are compiled in
    place (``scope = "blocks"``)."""
    if scope == "model":
        return torch.compile(model, backend=backend)
    if scope != "blocks":
        raise ValueError(f"runtime.compile_scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    regions = compile_regions(backbone)
    # Every region has one code object (its class's forward); Dynamo falls back to eager, with a warning,
    # after recompile_limit (8) graphs per code object. Units of distinct shapes need a graph each, so at
    # most one per region: a deeper or more varied backbone must not silently lose its compiled tail.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(regions))
    for region in regions:
        # dynamic=False: a training batch never changes shape, and units of different widths must get
        # graphs specialised to their shapes (cuDNN/Triton pick kernels per shape), not one symbolic graph.
        region.compile(backend=backend, dynamic=False)
    return model
