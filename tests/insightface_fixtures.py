"""The golden files written by InsightFace ``arcface_torch`` (tests/data/insightface_golden, see its README).

The backbone fixtures store no weights: every tensor of arcface_torch's ``state_dict()`` is defined by a
formula of its shape and position, and ``embeddings`` are what arcface_torch's own model computed from
those weights (eval mode, float32) for a formula-defined input. :func:`golden_state_dict` rebuilds the
exact tensors from the README's formula, in arcface_torch's key names and order.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "insightface_golden"
PFC_RUN = GOLDEN / "pfc_run_w2"
BACKBONE_ARCHS = ("r18", "r50", "r100", "mbf")

__all__ = ["GOLDEN", "PFC_RUN", "BACKBONE_ARCHS", "formula", "golden_listing", "golden_state_dict",
           "golden_input", "golden_embeddings"]


def formula(shape: tuple[int, ...] | list[int], key_index: int, kind: str) -> torch.Tensor:
    """The README's tensor formula: integer hash of the element index and key position -> float32."""
    n = int(np.prod(shape)) if len(shape) else 1
    index = np.arange(n, dtype=np.int64)
    h = (index * 2654435761 + (key_index + 1) * 40503) % 65521
    u = h / 65521.0 - 0.5
    if kind == "weight":
        values = u * 0.6 * np.sqrt(3) / np.sqrt(int(np.prod(shape[1:])))
    elif kind == "weight_bn":
        values = 1.0 + 0.2 * u
    elif kind in ("bias", "running_mean"):
        values = 0.1 * u
    elif kind == "running_var":
        values = 0.5 + np.abs(u)
    elif kind == "prelu":
        values = 0.25 + 0.1 * u
    else:
        raise ValueError(f"unknown formula kind {kind!r}")
    return torch.from_numpy(values.astype(np.float32).reshape(tuple(shape)))


@cache
def golden_listing(arch: str) -> dict[str, Any]:
    return json.loads((GOLDEN / f"{arch}.json").read_text())


def golden_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """arcface_torch's ``state_dict()`` of ``arch`` with the formula's values (num_batches_tracked = 0)."""
    state = {}
    for entry in golden_listing(arch)["state_dict"]:
        if entry["formula"] is None:
            state[entry["key"]] = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        else:
            state[entry["key"]] = formula(entry["shape"], entry["key_index"], entry["formula"])
    return state


def golden_input(batch: int = 2) -> torch.Tensor:
    """The fixture input: already normalised NCHW values in [-0.5, 0.5)."""
    return formula((batch, 3, 112, 112), 10000, "bias") * 10.0


def golden_embeddings(arch: str) -> torch.Tensor:
    return torch.tensor(golden_listing(arch)["embeddings"], dtype=torch.float32)
