"""Continue an InsightFace ``arcface_torch`` training run here (``output.resume_from_insightface = DIR``).

An arcface_torch run (``train_v2.py`` with ``save_all_states``) leaves one ``checkpoint_gpu_{rank}.pt``
per rank: ``epoch`` (the next epoch to run), ``global_step``, ``state_dict_backbone``,
``state_dict_softmax_fc`` (``{"weight": [num_local, D]}``), ``state_optimizer`` (ONE torch SGD over the
param groups ``[backbone, partial fc]``) and ``state_lr_scheduler``. :func:`import_insightface_run`
turns them into a training checkpoint of ours, ``output.dir/checkpoints/step_{global_step}``, which the
normal resume (:func:`arcface.train_state.load_training_checkpoint`) then loads on ANY world size,
resharding the FC by class range. What maps to what:

====================================================  ===============================================
arcface_torch                                         here
====================================================  ===============================================
``global_step``                                       the step (optimiser updates done)
``epoch``                                             the sampler starts that epoch from its beginning
rank 0's ``state_dict_backbone``                      ``backbone.pt`` (names: backbones.insightface)
group 0 ``momentum_buffer`` (by parameter)            ``optimizer.pt``: torch SGD momentum, by name
rank r's ``state_dict_softmax_fc["weight"]``          FC shard r of W: classes ``[r*(C//W) + min(r, C%W),
                                                      ...)``, arcface_torch's split = arcface.head.partition's
group 1 ``momentum_buffer`` of rank r                 that shard's RowSGD momentum rows
``state_lr_scheduler``                                checked: the configured schedule must continue it
====================================================  ===============================================

Refused with a message saying why (nothing is written): AdamW state, a grad scaler state or any other
entry this code does not know, Nesterov/dampening, momentum or weight decay other than the config's, a
backbone other than the configured one, a schedule that the config would not continue exactly, a class
split that is not arcface_torch's, missing or inconsistent rank files.

Not carried over, by necessity: RNG streams (arcface_torch saves none: every rank gets a fresh one), the
data order (its DistributedSampler shuffles differently from ours: the saved epoch restarts), and the
BatchNorm statistics of ranks 1..W-1 (arcface_torch's DDP runs with ``broadcast_buffers=False``, so each
rank keeps its own; rank 0's are taken, as its ``model.pt`` does). During warmup arcface_torch's
``PolynomialLRWarmup`` gives update ``s`` the rate ``lr * s / warmup`` where ours gives
``lr * (s + 1) / warmup``; a run stopped inside warmup therefore finishes its warmup one increment ahead
(the log says so), and from the end of warmup on the two schedules are the same function.
"""

from __future__ import annotations

import math
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from arcface.checkpoint import BACKBONE_FILE, CheckpointError, backbone_kwargs, step_dirname, write_meta
from arcface.config import TrainConfig
from arcface.head.partition import ClassPartition

__all__ = ["RUN_FILE_PATTERN", "InsightFaceSchedule", "list_run_files", "schedule_from_state",
           "import_insightface_run"]

RUN_FILE_PATTERN = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
_KNOWN_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer",
               "state_lr_scheduler")
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_SGD_FIXED = {"dampening": 0, "nesterov": False, "maximize": False}  # what RowSGD / our SGD use
_LR_RTOL = 1e-9  # two float64 evaluations of the same schedule formula agree far better than this


def list_run_files(directory: str | Path) -> list[Path]:
    """``checkpoint_gpu_0.pt .. checkpoint_gpu_{W-1}.pt`` of an arcface_torch output folder, in rank order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"output.resume_from_insightface: {directory}: not a folder")
    found = {int(m[1]): p for p in directory.iterdir() if (m := RUN_FILE_PATTERN.match(p.name))}
    if not found:
        raise CheckpointError(f"output.resume_from_insightface: {directory}: no checkpoint_gpu_*.pt (an "
                              "arcface_torch run saves them with config.save_all_states = True)")
    world_size = max(found) + 1
    missing = [f"checkpoint_gpu_{r}.pt" for r in range(world_size) if r not in found]
    if missing:
        raise CheckpointError(f"output.resume_from_insightface: {directory}: {', '.join(missing)} missing "
                              f"(found ranks {sorted(found)}); every rank's file is needed")
    return [found[r] for r in range(world_size)]


def _load(path: Path) -> dict[str, Any]:
    try:
        # mmap: of ranks 1.. only the FC shard and its momentum are read, not their backbone copies.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, not a torch file, or objects that would need code to unpickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read as an arcface_torch run checkpoint with "
                              f"weights_only=True (nothing was executed): {first}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not an arcface_torch run checkpoint (a {type(loaded).__name__})")
    missing = [k for k in _KNOWN_KEYS if k not in loaded]
    if missing:
        raise CheckpointError(f"{path}: not an arcface_torch run checkpoint: no {', '.join(missing)}")
    unknown = [str(k) for k in loaded if k not in _KNOWN_KEYS]
    if unknown:
        scaler = [k for k in unknown if re.search(r"scal|amp", k, re.IGNORECASE)]
        why = (f"{scaler[0]!r} looks like a fp16 grad scaler state: its loss scale and growth counter belong "
               "to arcface_torch's GradScaler settings (growth_interval=100), which this trainer does not "
               "share, so it is not carried over silently" if scaler else
               "this code does not know what they hold, so it will not guess")
        raise CheckpointError(f"{path}: cannot be continued here: entries {', '.join(map(repr, unknown))}; "
                              f"{why}. Start from its weights with backbone.init_from instead")
    return loaded


@dataclass(frozen=True)
class InsightFaceSchedule:
    """An arcface_torch LR schedule and the equivalent polynomial schedule of ours.

    ``total_steps`` / ``warmup_steps`` are in OUR convention (:func:`arcface.optim.lr_at`): the two agree
    on every update from the end of warmup on.
    """

    kind: str
    base_lr: float
    fc_lr_scale: float
    total_steps: int
    warmup_steps: int
    power: float
    position: int  # the scheduler's own step counter at the save

    def overrides(self, global_batch: int) -> str:
        return (f"schedule.name=polynomial schedule.total_steps={self.total_steps} "
                f"schedule.warmup_steps={self.warmup_steps} schedule.warmup_epochs=0 "
                f"schedule.power={self.power} schedule.min_lr=0 optim.lr={self.base_lr} "
                f"optim.base_batch_size={global_batch} fc.lr_scale={self.fc_lr_scale}")


def schedule_from_state(state: dict[str, Any], path: Path | str = "state_lr_scheduler"
                        ) -> InsightFaceSchedule:
    """Read ``state_lr_scheduler``: ``PolynomialLRWarmup`` (current arcface_torch) or ``PolyScheduler``."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_lr_scheduler is not a dict")
    base_lrs = [float(v) for v in state.get("base_lrs", [])]
    if not base_lrs:
        raise CheckpointError(f"{path}: state_lr_scheduler has no base_lrs")
    fc_scale = base_lrs[-1] / base_lrs[0] if len(base_lrs) > 1 else 1.0
    if {"total_iters", "warmup_iters", "power"} <= set(state):
        # PolynomialLRWarmup: update s (0-based) runs at base * s / W (s <= W), then
        # base * (1 - (s - W) / (T - W)) ** power: from s = W on exactly ours with the same T and W.
        return InsightFaceSchedule("PolynomialLRWarmup", base_lrs[0], fc_scale, int(state["total_iters"]),
                                   int(state["warmup_iters"]), float(state["power"]),
                                   int(state["last_epoch"]))
    if {"max_steps", "warmup_steps", "power", "base_lr"} <= set(state):
        # PolyScheduler (earlier arcface_torch): its counter lags the update by one, so update s runs at
        # base * (1 - (s - 1 - W) / (T - W)) ** power after warmup: ours with T + 1 and W + 1.
        return InsightFaceSchedule("PolyScheduler", float(state["base_lr"]), fc_scale,
                                   int(state["max_steps"]) + 1, int(state["warmup_steps"]) + 1,
                                   float(state["power"]), int(state["last_epoch"]) + 1)
    raise CheckpointError(f"{path}: unknown LR scheduler state (keys {sorted(state)}); known: "
                          "arcface_torch's PolynomialLRWarmup and PolyScheduler")


def _check_sgd(optimizer_state: dict[str, Any], path: Path, cfg: TrainConfig) -> list[dict[str, Any]]:
    groups = optimizer_state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 2:
        count = len(groups) if isinstance(groups, list) else "no"
        raise CheckpointError(f"{path}: state_optimizer has {count} param groups; arcface_torch's "
                              "train_v2.py has two: [backbone, partial fc]")
    if any("betas" in g for g in groups):
        raise CheckpointError(
            f"{path}: the run used AdamW (state_optimizer holds Adam moments); continuing an AdamW run "
            "is not supported here (only SGD momentum is mapped). Start from its weights with "
            "backbone.init_from")
    for index, group in enumerate(groups):
        if "momentum" not in group:
            raise CheckpointError(f"{path}: state_optimizer group {index} is not SGD (keys {sorted(group)})")
        for key, value in _SGD_FIXED.items():
            if bool(group.get(key, value)) != bool(value):
                raise CheckpointError(f"{path}: SGD {key}={group[key]!r} in group {index}; this trainer's "
                                      f"SGD runs with {key}={value!r}, so its momentum would mean something "
                                      "else")
        for key, ours in (("momentum", cfg.optim.momentum), ("weight_decay", cfg.optim.weight_decay)):
            if float(group[key]) != float(ours):
                raise CheckpointError(f"{path}: the run's SGD {key} is {group[key]} (group {index}), the "
                                      f"config says {ours}; set optim.{key}={group[key]} to continue it")
    if cfg.optim.name != "sgd" or cfg.fc_optimizer_name() != "sgd":
        raise CheckpointError(f"{path}: the run used SGD; set optim.name=sgd and fc.optimizer=same (the "
                              f"config says optim.name={cfg.optim.name}, fc.optimizer={cfg.fc.optimizer})")
    if cfg.optim.no_decay_bn_bias_prelu:
        raise CheckpointError(f"{path}: arcface_torch decays every parameter; set "
                              "optim.no_decay_bn_bias_prelu=false to continue its run")
    if len(groups[1]["params"]) != 1:
        raise CheckpointError(f"{path}: the partial fc param group holds {len(groups[1]['params'])} tensors, "
                              "expected 1 (PartialFC_V2's weight)")
    return groups


def _momentum(optimizer_state: dict[str, Any], index: int, path: Path) -> torch.Tensor | None:
    entry = optimizer_state.get("state", {}).get(index)
    if entry is None:
        return None  # never received a gradient: no history, as a fresh buffer
    unknown = set(entry) - {"momentum_buffer"}
    if unknown:
        raise CheckpointError(f"{path}: optimizer state of parameter {index} holds {sorted(unknown)}, not "
                              "SGD momentum; it cannot be mapped")
    return entry.get("momentum_buffer")


def _backbone_optimizer_state(cfg: TrainConfig, converted: Any, state_dict: dict[str, torch.Tensor],
                              optimizer_state: dict[str, Any], groups: list[dict[str, Any]],
                              path: Path) -> dict[str, Any]:
    """Our backbone optimiser's ``state_dict()`` holding the run's SGD momentum, matched by name."""
    from arcface.optim import build_backbone_optimizer
    from backbones import create_backbone

    # backbone.parameters() order = the parameter keys of its state_dict, in order.
    their_params = [k for k in state_dict if not k.endswith(_BUFFER_SUFFIXES)]
    indices = groups[0]["params"]
    if len(indices) != len(their_params):
        raise CheckpointError(f"{path}: the backbone param group holds {len(indices)} tensors but the "
                              f"backbone has {len(their_params)} parameters")
    with torch.device("meta"):  # names and shapes only
        model = create_backbone(converted.name, **converted.kwargs)
    named = dict(model.named_parameters())
    optimizer = build_backbone_optimizer(cfg, model)
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for key, index in zip(their_params, indices):
        buffer = _momentum(optimizer_state, index, path)
        if buffer is None:
            continue
        param = named[converted.key_map[key]]
        if id(param) not in trainable:
            raise CheckpointError(f"{path}: {key} has SGD momentum but is frozen here")
        if tuple(buffer.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: momentum of {key} has shape {list(buffer.shape)}, the parameter "
                                  f"{list(param.shape)}")
        optimizer.state[param] = {"momentum_buffer": buffer.detach().clone().float()}
    return optimizer.state_dict()


def _check_backbone(cfg: TrainConfig, converted: Any, path: Path) -> None:
    from backbones import canonical_name

    name, kwargs = backbone_kwargs(cfg.to_dict())
    wanted = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in kwargs.items() if k != "dropout"}
    found = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in converted.kwargs.items()}
    if canonical_name(name) != converted.name or wanted != found:
        settings = " ".join([f"backbone.name={converted.name}"] + [
            f"backbone.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "")
            for k, v in found.items()])
        raise CheckpointError(f"{path}: the run trained {converted.describe()}; the config builds {name} "
                              f"{wanted}. Set {settings}")


def _check_schedule(cfg: TrainConfig, schedule: InsightFaceSchedule, saved_lr: float, global_step: int,
                    num_images: int, world_size: int, path: Path) -> str:
    """Raise unless the configured schedule continues the run's; returns a note for the log."""
    from arcface.optim import lr_at

    if schedule.position != global_step:
        raise CheckpointError(f"{path}: the LR scheduler stepped {schedule.position} times but global_step "
                              f"is {global_step}; the schedule position is ambiguous")
    global_batch = cfg.global_batch_size(world_size)
    total, warmup = cfg.total_steps(num_images, world_size), cfg.warmup_steps(num_images, world_size)
    ours = (cfg.schedule.name, total, warmup, cfg.schedule.power, cfg.schedule.min_lr, cfg.fc.lr_scale)
    theirs = ("polynomial", schedule.total_steps, schedule.warmup_steps, schedule.power, 0.0,
              schedule.fc_lr_scale)
    base_lr = cfg.scaled_lr(world_size)
    same_base = math.isclose(base_lr, schedule.base_lr, rel_tol=_LR_RTOL)
    if ours != theirs or not same_base:
        raise CheckpointError(
            f"{path}: the run's LR schedule ({schedule.kind}: base lr {schedule.base_lr}, warmup and total "
            f"{schedule.warmup_steps} / {schedule.total_steps} updates in this trainer's convention, power "
            f"{schedule.power}) is not what the config gives on {world_size} rank(s) (schedule "
            f"{ours[0]}, {ours[2]} / {ours[1]} updates, power {ours[3]}, min_lr {ours[4]}, base lr "
            f"{base_lr:.6g} = optim.lr x global batch {global_batch} / optim.base_batch_size). To continue "
            f"it set: {schedule.overrides(global_batch)}")
    steps_per_epoch = cfg.steps_per_epoch(num_images, world_size)
    if global_step < schedule.warmup_steps:
        increment = schedule.base_lr / schedule.warmup_steps
        return (f"stopped inside warmup (update {global_step + 1} of {schedule.warmup_steps}): the remaining "
                f"warmup updates run {increment:.6g} above arcface_torch's (lr x (s + 1) / W here, lr x s / "
                "W there); from the end of warmup on the schedules are identical")
    next_lr = lr_at(global_step, cfg, ours[1], base_lr, steps_per_epoch=steps_per_epoch)
    if not math.isclose(next_lr, saved_lr, rel_tol=_LR_RTOL):
        raise CheckpointError(f"{path}: the run's next learning rate is {saved_lr!r}; the configured "
                              f"schedule gives {next_lr!r} at update {global_step + 1}")
    return f"next learning rate {next_lr:.6g}, as the run's scheduler saved it"


def import_insightface_run(cfg: TrainConfig, source: str | Path, checkpoints_dir: str | Path, *,
                           num_images: int, num_classes: int, loader_state: dict[str, Any],
                           world_size: int) -> str:
    """Write an arcface_torch run as ``checkpoints_dir/step_{global_step:08d}``; returns a line for the log.

    Called on ONE process (rank 0) with this run's config, dataset size and class count, the data
    loader's ``state_dict()`` (a template: the position is set to the run's epoch) and the world size the
    run continues on (for the schedule check). Everything is validated before the directory appears
    under its final name.
    """
    from arcface.head.shard_checkpoint import write_fc_shard_file
    from arcface.train_state import OPTIMIZER_FILE, TRAINING_KIND, TrainingState
    from backbones.insightface import InsightFaceWeightsError, convert_insightface_state_dict

    source = Path(source)
    files = list_run_files(source)
    their_world = len(files)
    first = _load(files[0])
    epoch, global_step = int(first["epoch"]), int(first["global_step"])
    try:
        converted = convert_insightface_state_dict(first["state_dict_backbone"],
                                                   source=f"{files[0]} (state_dict_backbone)")
    except InsightFaceWeightsError as exc:
        raise CheckpointError(str(exc)) from None
    _check_backbone(cfg, converted, files[0])
    groups = _check_sgd(first["state_optimizer"], files[0], cfg)
    schedule = schedule_from_state(first["state_lr_scheduler"], files[0])
    note = _check_schedule(cfg, schedule, float(groups[0]["lr"]), global_step, num_images, world_size,
                           files[0])

    # Rows per rank: the class count is their sum; each rank's count must be arcface_torch's (= our) split.
    rows = [int(first["state_dict_softmax_fc"]["weight"].shape[0])]
    fc_keys = sorted(first["state_dict_softmax_fc"])
    if fc_keys != ["weight"]:
        raise CheckpointError(f"{files[0]}: state_dict_softmax_fc holds {fc_keys}; PartialFC_V2 saves only "
                              "'weight' (an older Partial FC keeps its state elsewhere)")
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / step_dirname(global_step)
    tmp = checkpoints_dir / f".tmp-import-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shards: list[tuple[int, Path, dict[str, Any]]] = []
        for rank, path in enumerate(files):
            loaded = first if rank == 0 else _load(path)
            if (int(loaded["epoch"]), int(loaded["global_step"])) != (epoch, global_step):
                raise CheckpointError(f"{path}: epoch {loaded['epoch']}, global_step "
                                      f"{loaded['global_step']}; {files[0].name} has {epoch}, {global_step}: "
                                      "files of different saves")
            fc = loaded["state_dict_softmax_fc"]
            if sorted(fc) != ["weight"] or fc["weight"].dim() != 2:
                raise CheckpointError(f"{path}: state_dict_softmax_fc is not PartialFC_V2's "
                                      "{'weight': [rows, D]}")
            if int(fc["weight"].shape[1]) != converted.kwargs["embedding_size"]:
                raise CheckpointError(f"{path}: FC rows of size {fc['weight'].shape[1]}, the backbone embeds "
                                      f"{converted.kwargs['embedding_size']}")
            their_groups = loaded["state_optimizer"].get("param_groups", [])
            if rank and [{k: v for k, v in g.items() if k != "params"} for g in their_groups] != \
                    [{k: v for k, v in g.items() if k != "params"} for g in groups]:
                raise CheckpointError(f"{path}: optimizer hyper-parameters differ from {files[0].name}'s")
            momentum = _momentum(loaded["state_optimizer"], int(their_groups[1]["params"][0]), path)
            if momentum is not None and momentum.shape != fc["weight"].shape:
                raise CheckpointError(f"{path}: FC momentum of shape {list(momentum.shape)} for a weight of "
                                      f"shape {list(fc['weight'].shape)}")
            if rank:
                rows.append(int(fc["weight"].shape[0]))
            shards.append((rank, path, {"weight": fc["weight"], "momentum": momentum}))
            if rank:
                del loaded
        num_total = sum(rows)
        if num_total != num_classes:
            raise CheckpointError(f"{source}: the run classifies {num_total} classes "
                                  f"({' + '.join(map(str, rows))} rows over {their_world} ranks), the data "
                                  f"here has {num_classes}")
        for rank, path, shard in shards:
            partition = ClassPartition(num_total, their_world, rank)
            if rows[rank] != partition.num_local:
                raise CheckpointError(f"{path}: {rows[rank]} FC rows on rank {rank}; arcface_torch's split "
                                      f"of {num_total} classes over {their_world} ranks gives "
                                      f"{partition.num_local}")
            momentum = shard["momentum"]
            row_state = {} if momentum is None else {"momentum_buffer": momentum.detach().clone()}
            fc_group = {key: float(groups[1][key]) for key in ("lr", "momentum", "weight_decay")}
            payload = {"type": "RowSGD", "param_groups": [fc_group], "row_state": row_state}
            write_fc_shard_file(tmp, partition, shard["weight"].detach().clone(), payload)
        torch.save(converted.state_dict, tmp / BACKBONE_FILE)
        optimizer_state = _backbone_optimizer_state(cfg, converted, first["state_dict_backbone"],
                                                    first["state_optimizer"], groups, files[0])
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        loader = dict(loader_state, epoch=epoch, consumed=0)
        state = TrainingState(step=global_step, epoch=epoch, loader=loader)
        imported = {"format": "insightface", "dir": str(source), "files": [p.name for p in files],
                    "world_size": their_world, "global_step": global_step, "epoch": epoch,
                    "backbone": converted.describe(), "schedule": schedule.kind}
        write_meta(tmp, global_step, cfg.to_dict(), world_size=their_world,
                   extra={"kind": TRAINING_KIND, "training": asdict(state), "rng_saved": False,
                          "imported_from": imported})
        if final.exists():
            raise CheckpointError(f"{final}: exists already; not overwriting it with the imported run")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (f"imported the arcface_torch run {source} ({their_world} rank files, {num_total} classes, "
            f"epoch {epoch}, global step {global_step}, {converted.describe()}; backbone, its BN statistics "
            f"and momentum from rank 0) as {final}; {note}")
