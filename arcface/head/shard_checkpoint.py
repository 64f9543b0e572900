"""Save each rank's FC shard (+ row optimiser state) and load it back on ANY world size.

Layout inside a checkpoint directory: one file per saving rank,
``fc_shard_{rank:05d}-of-{world_size:05d}.pt``, each holding plain tensors (loads with
``weights_only=True``) and its global class range::

    format_version, num_classes, embedding_size, world_size, rank, class_start, num_local,
    weight [num_local, D] fp32, sampler_rng (uint8 state of the negative sampler),
    optimizer: None | {type, param_groups (hyper-parameters), row_state {key: [num_local, ...]}}
    extra_rows (only when an objective keeps more per-class tables): {name: [num_local, ...]}, e.g.
        the class centres of the center loss, resharded exactly like the weight
    margin_state (only for heads with buffers): {name: tensor}, running values that are the same on
        every rank (e.g. L-Softmax's iteration count, AdaFace's norm statistics)

Loading rebuilds this rank's rows ``[class_start, class_end)`` from the overlapping saved shards
(memory-mapped, so a rank reads only the bytes it needs), for the weight, every row of optimiser
state and every extra row table, so a run saved on 2 ranks resumes on 3 or on 1 with the same global
FC matrix (and centres).

Why not ``torch.distributed.checkpoint`` (DCP): DCP reshards DTensors / ShardedTensors by their chunk
metadata, but a DTensor ``Shard(0)`` placement can only express torch.chunk-style splits (ceil-sized
chunks, the remainder on the last ranks), not our balanced ``C // W + (rank < C % W)`` split, and
ShardedTensor (arbitrary shard metadata) is deprecated; the remaining route to custom chunk
offsets, DCP's ``torch.distributed._checkpointable`` protocol, is private API. Padding the class
dimension for DTensor would make the padded row layout depend on W, which defeats resharding.
Storing every shard under its own key with its global range and resolving overlaps ourselves is a few
lines, needs no collective, and works the same with or without a process group.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.head.row_optim import ROW_STATE_KEYS, RowAdamW, RowSGD

__all__ = ["FC_FORMAT_VERSION", "FCCheckpointError", "shard_filename", "save_fc_shard", "write_fc_shard_file",
           "load_fc_resharded", "list_fc_shards"]

FC_FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^fc_shard_(\d{5})-of-(\d{5})\.pt$")


class FCCheckpointError(RuntimeError):
    """FC shards are missing, inconsistent, or do not fit the classifier being loaded."""


def shard_filename(rank: int, world_size: int) -> str:
    """File name of one rank's shard."""
    return f"fc_shard_{rank:05d}-of-{world_size:05d}.pt"


def _check_optimizer(pfc: PartialFC, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, (RowSGD, RowAdamW)):
        raise TypeError(f"FC optimizer must be RowSGD or RowAdamW (PartialFC.build_optimizer), "
                        f"got {type(optimizer).__name__}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != 1 or params[0] is not pfc.weight:
        raise ValueError("the FC optimizer must optimise exactly the PartialFC weight shard")


def save_fc_shard(directory: str | os.PathLike[str], pfc: PartialFC,
                  optimizer: torch.optim.Optimizer | None = None,
                  extra_rows: dict[str, torch.Tensor] | None = None) -> Path:
    """Write this rank's shard file into ``directory`` (temp name, then rename); every rank calls it.

    ``extra_rows``: further per-class tables of this rank (first dimension ``num_local``, row ``i`` =
    class ``class_start + i``), saved beside the weight and resharded with it by
    :func:`load_fc_resharded`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    part = pfc.partition
    optimizer_payload: dict[str, Any] | None = None
    if optimizer is not None:
        _check_optimizer(pfc, optimizer)
        state = optimizer.state.get(pfc.weight, {})
        unknown = set(state) - set(ROW_STATE_KEYS)
        if unknown:
            raise ValueError(f"FC optimizer state has entries that cannot be resharded: {sorted(unknown)}")
        optimizer_payload = {
            "type": type(optimizer).__name__,
            "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                              if k != "params"} for group in optimizer.param_groups],
            "row_state": {key: value.detach().cpu() for key, value in state.items()},
        }
    if extra_rows:
        for name, table in extra_rows.items():
            if table.dim() < 1 or table.shape[0] != part.num_local:
                raise ValueError(f"extra row table {name!r} has shape {tuple(table.shape)}, expected "
                                 f"[{part.num_local}, ...] (one row per class of this rank)")
    margin_state = {name: buffer.detach().cpu() for name, buffer in pfc.margin.named_buffers()}
    return write_fc_shard_file(directory, part, pfc.weight.detach().cpu(), optimizer_payload,
                               sampler_rng=pfc.generator.get_state(), extra_rows=extra_rows,
                               margin_state=margin_state)


def write_fc_shard_file(directory: str | os.PathLike[str], partition: ClassPartition, weight: torch.Tensor,
                        optimizer: dict[str, Any] | None, sampler_rng: torch.Tensor | None = None,
                        extra_rows: dict[str, torch.Tensor] | None = None,
                        margin_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one shard file from plain tensors (``weight`` ``[num_local, D]`` of ``partition``'s rows,
    ``optimizer`` as in the module doc, ``extra_rows`` further per-class tables, ``margin_state`` the
    margin's running buffers). Without ``sampler_rng`` a resumed rank keeps its fresh sampler stream
    (used for shards imported from another trainer, which saved none)."""
    directory = Path(directory)
    if tuple(weight.shape[:1]) != (partition.num_local,) or weight.dim() != 2:
        raise ValueError(f"weight of shape {list(weight.shape)} is not [{partition.num_local}, D] for rank "
                         f"{partition.rank} of {partition.world_size}")
    payload = {
        "format_version": FC_FORMAT_VERSION,
        "num_classes": partition.num_classes,
        "embedding_size": int(weight.shape[1]),
        "world_size": partition.world_size,
        "rank": partition.rank,
        "class_start": partition.class_start,
        "num_local": partition.num_local,
        "weight": weight,
        "optimizer": optimizer,
    }
    if sampler_rng is not None:
        payload["sampler_rng"] = sampler_rng
    if extra_rows:
        payload["extra_rows"] = {name: table.detach().cpu() for name, table in extra_rows.items()}
    if margin_state:
        payload["margin_state"] = margin_state
    final = directory / shard_filename(partition.rank, partition.world_size)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, final)
    return final


def list_fc_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """The complete set of shard files in ``directory``, in rank order (raises if incomplete)."""
    directory = Path(directory)
    found: dict[int, dict[int, Path]] = {}
    for path in directory.iterdir() if directory.is_dir() else []:
        match = _SHARD_RE.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise FCCheckpointError(f"{directory}: no FC shard files (fc_shard_RRRRR-of-WWWWW.pt)")
    if len(found) > 1:
        raise FCCheckpointError(f"{directory}: FC shards from several world sizes {sorted(found)}")
    (world_size, by_rank), = found.items()
    missing = [shard_filename(r, world_size) for r in range(world_size) if r not in by_rank]
    if missing:
        raise FCCheckpointError(f"{directory}: incomplete FC checkpoint, missing {', '.join(missing[:5])}")
    return [by_rank[r] for r in range(world_size)]


def _load_shard(path: Path) -> dict[str, Any]:
    try:
        # mmap: only the pages of the rows this rank copies are ever read.
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt / truncated / not a torch file
        raise FCCheckpointError(f"{path}: cannot read FC shard ({exc})") from exc
    for key in ("format_version", "num_classes", "embedding_size", "world_size", "rank", "class_start",
                "num_local", "weight", "optimizer"):
        if key not in shard:
            raise FCCheckpointError(f"{path}: FC shard lacks key {key!r}")
    if shard["format_version"] != FC_FORMAT_VERSION:
        raise FCCheckpointError(f"{path}: format_version {shard['format_version']} is not supported "
                                f"(expected {FC_FORMAT_VERSION})")
    if tuple(shard["weight"].shape) != (shard["num_local"], shard["embedding_size"]):
        raise FCCheckpointError(f"{path}: weight shape {tuple(shard['weight'].shape)} does not match "
                                f"num_local={shard['num_local']}, embedding_size={shard['embedding_size']}")
    return shard


@torch.no_grad()
def load_fc_resharded(directory: str | os.PathLike[str], pfc: PartialFC,
                      optimizer: torch.optim.Optimizer | None = None,
                      extra_rows: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Fill ``pfc``'s shard (and ``optimizer``'s row state and hyper-parameters) from ``directory``.

    Works for any saving world size. The negative sampler's RNG state is restored only when the world
    size is unchanged (otherwise each rank keeps its freshly seeded stream). ``extra_rows`` are this
    rank's tables to fill (in place) from the tables of the same names saved by
    :func:`save_fc_shard`. The head's buffers (``margin_state``) are restored when the shards hold
    them. Returns ``{"saved_world_size": int, "resharded": bool}``.
    """
    paths = list_fc_shards(directory)
    shards = [_load_shard(p) for p in paths]
    part = pfc.partition
    expected_start = 0
    for path, shard in zip(paths, shards):
        if shard["num_classes"] != part.num_classes:
            raise FCCheckpointError(f"{path}: num_classes {shard['num_classes']} differs from the model's "
                                    f"{part.num_classes}")
        if shard["embedding_size"] != pfc.embedding_size:
            raise FCCheckpointError(f"{path}: embedding_size {shard['embedding_size']} differs from the "
                                    f"model's {pfc.embedding_size}")
        if shard["class_start"] != expected_start:
            raise FCCheckpointError(f"{path}: class_start {shard['class_start']} leaves a gap or overlap "
                                    f"(expected {expected_start})")
        expected_start += shard["num_local"]
    if expected_start != part.num_classes:
        raise FCCheckpointError(f"{directory}: shards cover {expected_start} classes, not {part.num_classes}")

    if optimizer is not None:
        _check_optimizer(pfc, optimizer)
        for path, shard in zip(paths, shards):
            saved = shard["optimizer"]
            if saved is None:
                raise FCCheckpointError(f"{path}: no optimizer state was saved with this FC shard")
            if saved["type"] != type(optimizer).__name__:
                raise FCCheckpointError(f"{path}: optimizer type {saved['type']} differs from "
                                        f"{type(optimizer).__name__}")
    extra_rows = extra_rows or {}
    for path, shard in zip(paths, shards):
        saved_tables = shard.get("extra_rows") or {}
        for name, table in extra_rows.items():
            if name not in saved_tables:
                raise FCCheckpointError(f"{path}: no {name!r} rows were saved with this FC shard (saved by "
                                        "another loss.kind?)")
            saved_table = saved_tables[name]
            if (saved_table.shape[0] != shard["num_local"] or saved_table.shape[1:] != table.shape[1:]
                    or saved_table.dtype != table.dtype):
                raise FCCheckpointError(f"{path}: {name!r} rows {tuple(saved_table.shape)} "
                                        f"{saved_table.dtype} do not fit [{shard['num_local']}, "
                                        f"{', '.join(str(d) for d in table.shape[1:])}] {table.dtype}")

    start, end = part.class_start, part.class_end
    weight = torch.empty_like(pfc.weight, device="cpu")
    tables = {name: torch.empty_like(table, device="cpu") for name, table in extra_rows.items()}
    row_state: dict[str, torch.Tensor] = {}
    for shard in shards:
        lo, hi = max(start, shard["class_start"]), min(end, shard["class_start"] + shard["num_local"])
        if lo >= hi:
            continue
        src = slice(lo - shard["class_start"], hi - shard["class_start"])
        dst = slice(lo - start, hi - start)
        weight[dst] = shard["weight"][src]
        for name, table in tables.items():
            table[dst] = shard["extra_rows"][name][src]
        if optimizer is not None:
            for key, value in shard["optimizer"]["row_state"].items():
                if key not in row_state:
                    # Rows from shards that never stepped stay zero: zero momentum / moments / step
                    # count is exactly "no history" for RowSGD and RowAdamW.
                    row_state[key] = torch.zeros((part.num_local, *value.shape[1:]), dtype=value.dtype)
                row_state[key][dst] = value[src]
    pfc.weight.copy_(weight)
    for name, table in tables.items():
        extra_rows[name].copy_(table)
    saved_margin_state = shards[0].get("margin_state") or {}
    for name, buffer in pfc.margin.named_buffers():
        # Replicated values (the same on every rank): the first shard's copy is everyone's.
        if name in saved_margin_state:
            buffer.copy_(saved_margin_state[name])

    if optimizer is not None:
        saved_groups = shards[0]["optimizer"]["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise FCCheckpointError(f"{paths[0]}: {len(saved_groups)} optimizer param groups, "
                                    f"expected {len(optimizer.param_groups)}")
        for group, saved in zip(optimizer.param_groups, saved_groups):
            for key, value in saved.items():
                group[key] = tuple(value) if key == "betas" else value
        optimizer.state[pfc.weight] = {key: value.to(pfc.weight.device) for key, value in row_state.items()}

    saved_world_size = shards[0]["world_size"]
    same_layout = saved_world_size == part.world_size
    if same_layout and "sampler_rng" in shards[part.rank]:
        pfc.generator.set_state(shards[part.rank]["sampler_rng"].clone())
    return {"saved_world_size": saved_world_size, "resharded": not same_layout}
