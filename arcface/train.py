"""The training loop: backbone (DDP) + sharded Partial FC, from one CPU process to many GPU nodes.

Launch::

    torchrun --nproc_per_node 8 -m arcface.train configs/ms1mv2_r100.toml [section.key=value ...]
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m arcface.train configs/webface42m_r100_pfc02.toml
    python -m arcface.train configs/cpu_synthetic.toml          # one process, no torchrun

:func:`train` reads top to bottom: build everything -> resume -> loop {step, log, verify, checkpoint}
-> close. Inside one optimiser update (``optim.accumulation_steps`` micro-batches):

1. ``set_lr``: the schedule is a pure function of the update index (``arcface.optim.lr_at``), so it is
   set once per update, never per micro-batch, and resuming needs only the step counter;
2. per micro-batch: normalise the uint8 batch on the device, backbone forward under autocast
   (fp16/bf16), ``scale_gradient(embeddings, W)`` (DDP averages gradients over ranks while the
   objective already returns the exact gradient of the global-batch loss: the factor W cancels the
   averaging, see arcface.objectives), the objective (``loss.kind``; the sharded Partial FC margin
   softmax by default) in fp32, backward of ``loss / accumulation_steps`` (DDP's all-reduce suppressed
   with ``no_sync`` on all but the last micro-batch);
3. one host sync per update: the loss and the backbone gradient norm (after unscaling) decide whether
   the update is applied. A non-finite loss skips the update and is counted; too many in a row stop
   the run with a message. With fp16 a non-finite gradient with a finite loss is the grad scaler's
   normal overflow signal: it lowers the scale and the update is skipped;
4. clip the backbone gradient norm, step the backbone's and the objective's optimisers (through the
   grad scaler), zero gradients.

After the update, in this order: the log line (so it reports the update just made), verification
(so that a checkpoint written at the same step knows whether it is the best), the preemption check
(all ranks agree, through one all-reduce, whether any received SIGTERM/SIGINT), the checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from arcface import preprocess
from arcface.checkpoint import CheckpointError, load_initial_weights, save_backbone_checkpoint
from arcface.compiling import compile_backbone
from arcface.config import TrainConfig, load_config
from arcface.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    scale_gradient,
    select_device,
)
from arcface.interop.run_import import import_configured_run
from arcface.launch import LAUNCHER_ENV
from arcface.launch import PROG as LAUNCHER_PROG
from arcface.logging_utils import MetricLogger
from arcface.objectives import Objective, build_objective
from arcface.optim import build_backbone_optimizer, lr_at, set_lr
from arcface.train_state import (
    CHECKPOINTS_DIR,
    TrainingState,
    find_resume_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
    seed_everything,
    unwrap_model,
)

__all__ = ["train", "main", "NonFiniteLossError", "StopTraining", "BEST_DIR", "BEST_FILE"]

BEST_DIR = "best"          # backbone-only checkpoint of the best verification result
BEST_FILE = "best.json"    # its scores


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a non-finite loss (runtime.max_nonfinite_steps)."""


class StopTraining(Exception):
    """Raised by an ``on_update`` hook to end the loop at once, without a checkpoint (benchmarks stop a
    run after their timed updates this way; the summary is returned as usual)."""


class _StopRequest:
    """Remembers SIGTERM/SIGINT (preemption, Ctrl-C) so the loop can checkpoint and stop at an update
    boundary.

    The same signal often arrives twice: a scheduler signals the job's whole process group and torchrun
    then forwards the signal to its workers. Repeats are therefore ignored, except a second Ctrl-C more
    than ``IMPATIENT_AFTER_S`` after the first, which falls back to the default action (an impatient
    user stops the run at once, without the checkpoint)."""

    IMPATIENT_AFTER_S = 2.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in a notebook worker)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._received_at = signum, time.monotonic()
            return
        impatient = time.monotonic() - self._received_at > self.IMPATIENT_AFTER_S
        if signum == signal.SIGINT and impatient:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def agreed(self, world_size: int, device: torch.device) -> int | None:
        """The signal number if ANY rank received one (collective when ``world_size > 1``)."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def _init_distributed(cfg: TrainConfig) -> DistContext:
    """:func:`arcface.distributed.init_distributed`, isolating each torchrun restart attempt's keys.

    Why: after a worker dies, ``torchrun --max-restarts`` starts new workers that rendezvous through the
    SAME agent-hosted TCPStore as the dead ones. Without a prefix, a new rank can read the previous
    attempt's keys (e.g. the dead peer's gloo listening address) before its peer overwrites them and
    then fails with "connection refused". A ``/attempt_N`` prefix keeps attempts apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt not in (None, "0") and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        device = select_device(cfg.runtime.device)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = dt.timedelta(seconds=1800)
        agent_hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=not agent_hosted and rank == 0, timeout=timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=dist.PrefixStore(f"/attempt_{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
    return init_distributed(device=cfg.runtime.device)


def _build_backbone(cfg: TrainConfig) -> nn.Module:
    from arcface.checkpoint import backbone_kwargs
    from backbones import create_backbone

    _, kwargs = backbone_kwargs(cfg.to_dict())  # the same arguments load_backbone rebuilds it with
    if cfg.backbone.gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    return create_backbone(cfg.backbone.name, **kwargs)


def _batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of micro-batches across epochs (the loader rolls its own epoch over)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"{loader.source}: the data loader produced no batch for epoch {loader.epoch}")


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    if cfg.runtime.amp == "none":
        return nullcontext()
    dtype = torch.float16 if cfg.runtime.amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _verify(cfg: TrainConfig, packs: list[Any], backbone: nn.Module, ctx: DistContext) -> dict[str, Any]:
    """Verification accuracy of every pack ({} on ranks that do not take part)."""
    from eval.embedder import ModelEmbedder
    from eval.verification import evaluate_pack

    spread = cfg.eval.distributed and ctx.world_size > 1
    results: dict[str, Any] = {}
    if spread or ctx.rank == 0:
        dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.runtime.amp]
        embedder = ModelEmbedder(unwrap_model(backbone), device=ctx.device, batch_size=cfg.eval.batch_size,
                                 dtype=dtype)
        # Eagerly, as the unwrapped whole-model compile does: blocks compiled in place would otherwise
        # compile again for eval mode and every batch size of the packs.
        with torch.compiler.set_stance("force_eager"):
            for pack in packs:
                result = evaluate_pack(embedder, pack, batch_size=cfg.eval.batch_size,
                                       rank=ctx.rank if spread else 0,
                                       world_size=ctx.world_size if spread else 1)
                results[pack.name] = result
    if not spread:
        barrier()  # the other ranks wait here while rank 0 evaluates
    return results


def train(cfg: TrainConfig, *, max_steps: int | None = None,
          backbone_factory: Callable[[TrainConfig], nn.Module] | None = None,
          on_update: Callable[[int, float], None] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train (or continue training) per ``cfg``; returns a summary dict.

    Extension points (for tests and embedding in other programs): ``max_steps`` stops (with a
    checkpoint) once that many updates are done, without changing the schedule's length;
    ``backbone_factory(cfg)`` replaces the registry lookup; ``on_update(step, loss)`` is called on every
    rank after each applied update, before logging.

    The summary holds ``step``, ``total_steps``, ``epoch``, ``losses`` (the loss of each update of this
    invocation, NaN for skipped ones), ``checkpoint`` (the last one written), ``resumed_from``,
    ``stopped_by`` (signal number or None), ``nonfinite_total``, ``verification`` (last results),
    ``best``, ``world_size``, ``loop_seconds`` (wall time of the loop), ``data_wait_seconds`` (of it,
    time this rank waited for data) and ``update_data_wait_seconds`` (that wait, per update of this
    invocation). An ``on_update`` hook that raises :class:`StopTraining` ends the loop without a
    checkpoint. ``quiet`` keeps the console silent (``train.log`` and TensorBoard still get everything).
    """
    # ---------------------------------------------------------------- build
    ctx = _init_distributed(cfg)
    rank, world_size, device = ctx.rank, ctx.world_size, ctx.device
    output_dir = Path(cfg.output.dir)
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(output_dir / "config.json")
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        # Fixed 112x112 inputs: let cuDNN time its convolution algorithms once per shape and keep the
        # fastest (the first updates are slower while it does).
        torch.backends.cudnn.benchmark = True

    # The same seed on every rank: identical backbone initialisation (DDP would broadcast rank 0's
    # anyway); the FC initialisation is independent of W by construction (arcface.head.partial_fc).
    seed_everything(cfg.runtime.seed)
    backbone = (backbone_factory or _build_backbone)(cfg).to(device)
    init_note = ""
    if cfg.backbone.init_from:  # fine-tuning: pretrained weights (ours or arcface_torch's), a fresh FC
        init_note = load_initial_weights(backbone, cfg.backbone.init_from, cfg.to_dict()["backbone"])
    if cfg.runtime.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    # Per-rank streams from here on (dropout masks differ between ranks, as they would in one big batch).
    seed_everything(cfg.runtime.seed + 1 + rank)

    loader = _build_loader(cfg, rank, world_size, device)
    objective = build_objective(cfg, loader.num_classes, rank, world_size, device)
    base_lr = cfg.scaled_lr(world_size)
    optimizer = build_backbone_optimizer(cfg, backbone, lr=base_lr)
    objective_optimizer = objective.build_optimizer(cfg, base_lr)
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.runtime.fp16_init_scale,
                                  enabled=cfg.runtime.amp == "fp16")
    # An epoch is every image once (every identity once with the P x K sampler).
    epoch_samples = getattr(loader, "samples_per_epoch", loader.num_images)
    total_steps = cfg.total_steps(epoch_samples, world_size)
    steps_per_epoch = cfg.steps_per_epoch(epoch_samples, world_size)
    accumulation = cfg.optim.accumulation_steps
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)

    # ---------------------------------------------------------------- resume
    state = TrainingState()
    # Another trainer's run named by the config (output.resume_from_insightface) is imported once, as this
    # run's first checkpoint; the resume below then loads it like any other (arcface.interop.run_import).
    import_note = import_configured_run(cfg, checkpoints_dir, num_images=loader.num_images,
                                        num_classes=loader.num_classes, loader_state=loader.state_dict(),
                                        rank=rank, world_size=world_size)
    # Rank 0 decides, everyone follows: ranks never disagree on where they resume from.
    resume_path = broadcast_object(str(find_resume_checkpoint(cfg.output.resume, output_dir) or "")
                                   if rank == 0 else None)
    resume_note = ""
    if resume_path:
        state, meta = load_training_checkpoint(resume_path, backbone=backbone, optimizer=optimizer,
                                               objective=objective, objective_optimizer=objective_optimizer,
                                               rank=rank, world_size=world_size,
                                               device=device)
        loader.load_state_dict(state.loader)
        if scaler.is_enabled() and state.scaler:
            scaler.load_state_dict(state.scaler)
        resume_note = (f"resumed from {resume_path} at step {state.step} (saved with world size "
                       f"{meta['world_size']}{', FC resharded' if meta['resharded'] else ''})")
        current = cfg.to_dict()
        changed = [f"{section}.{key}: {saved_value!r} -> {current[section][key]!r}"
                   for section, values in meta["config"].items() if section in current
                   for key, saved_value in values.items()
                   if key in current[section] and current[section][key] != saved_value]
        if changed:
            resume_note += "; config changed since the checkpoint: " + ", ".join(changed)

    model: nn.Module = backbone
    ddp_model: nn.parallel.DistributedDataParallel | None = None
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(backbone, device_ids=[device] if device.type == "cuda"
                                                        else None)
        model = ddp_model
    if cfg.runtime.compile:
        model = compile_backbone(model, backbone, cfg.runtime.compile_scope, cfg.runtime.compile_backend)
    packs = _load_packs(cfg, rank) if cfg.eval.every > 0 else []

    logger = MetricLogger(output_dir, total_steps, cfg.global_batch_size(world_size), cfg.runtime.log_every,
                          rank=rank, device=device, start_step=state.step, tensorboard=cfg.output.tensorboard,
                          stream=_NullStream() if quiet else None)
    # The keys the recipe and the command line set; the whole config is in config.json and checkpoints.
    changes = " ".join(f"{key}={json.dumps(value)}" for key, value in cfg.changes().items())
    logger.info(f"config ({output_dir / 'config.json'}), set apart from the defaults: {changes or 'nothing'}")
    logger.info(f"world size {world_size} ({ctx.backend or 'single process'}), device {device}, "
                f"{loader.num_images} images of {loader.num_classes} classes from {loader.source}, "
                f"global batch {cfg.global_batch_size(world_size)}, base lr {base_lr:.6g}, "
                f"{total_steps} updates ({steps_per_epoch} per epoch); objective: {objective.describe()}")
    for note in (init_note, import_note):
        if note:
            logger.info(note)
    if cfg.data.sampler != "shuffle":
        logger.info(loader.describe())
    logger.info(resume_note or "starting a fresh run")
    if device.type == "cpu" and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        logger.info("tip: on CPU, THP_MEM_ALLOC_ENABLE=1 (set by ./run.sh) backs large tensors with huge "
                    "pages; the Partial FC step of a large classifier runs up to 2x faster with it")

    stop = _StopRequest()
    stop.install()
    losses: list[float] = []
    update_data_waits: list[float] = []
    nonfinite_in_row = 0
    last_checkpoint: Path | None = Path(resume_path) if resume_path else None
    verification: dict[str, Any] = {}
    stopped_by: int | None = None
    batches = _batches(loader)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf

    # ---------------------------------------------------------------- loop
    loop_started = time.perf_counter()
    try:
        while state.step < stop_at:
            lr = lr_at(state.step, cfg, total_steps, base_lr, steps_per_epoch=steps_per_epoch)
            set_lr((optimizer, objective_optimizer), lr, cfg.fc.lr_scale)
            loss_sum = torch.zeros((), device=device)
            data_wait = 0.0
            for micro in range(accumulation):
                images, labels = next(batches)
                data_wait += loader.last_wait_seconds
                # Gradient all-reduce only on the last micro-batch: the inner ones just accumulate.
                sync = ddp_model.no_sync() if ddp_model is not None and micro < accumulation - 1 \
                    else nullcontext()
                with sync:
                    inputs = preprocess.normalize(images)
                    if cfg.runtime.channels_last:
                        inputs = inputs.contiguous(memory_format=torch.channels_last)
                    with _autocast(cfg, device):
                        embeddings = model(inputs)
                    embeddings = scale_gradient(embeddings, world_size)  # see module docstring, step 2
                    loss = objective(embeddings, labels)
                    scaler.scale(loss / accumulation).backward()
                loss_sum += loss.detach()
            state.epoch = loader.epoch

            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), max_norm)
            loss_value, norm_value = (float(v) for v in torch.stack([loss_sum / accumulation,
                                                                     grad_norm.float()]).tolist())
            applied = math.isfinite(loss_value) and math.isfinite(norm_value)
            if applied:
                nonfinite_in_row = 0
                scaler.step(optimizer)
                if objective_optimizer is not None:
                    scaler.step(objective_optimizer)
                scaler.update()
            elif math.isfinite(loss_value) and scaler.is_enabled():
                scaler.step(optimizer)  # records the overflow and skips the step
                scaler.update()         # lowers the loss scale
            else:
                if scaler.is_enabled():
                    scaler.update()  # closes this update's unscale_ (and lowers the scale)
                nonfinite_in_row += 1
                state.nonfinite_total += 1
                logger.info(f"step {state.step + 1}: non-finite loss/gradient (loss {loss_value}, grad norm "
                            f"{norm_value}); update skipped ({nonfinite_in_row} in a row)")
                if nonfinite_in_row >= cfg.runtime.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} consecutive updates had a non-finite loss or gradient (step "
                        f"{state.step + 1}, lr {lr:.6g}); stopping as runtime.max_nonfinite_steps = "
                        f"{cfg.runtime.max_nonfinite_steps}. Lower optim.lr, raise schedule warmup, use "
                        f"runtime.amp = 'bf16' or 'none', or resume from an earlier checkpoint")
            optimizer.zero_grad(set_to_none=True)
            if objective_optimizer is not None:
                objective_optimizer.zero_grad(set_to_none=True)
            state.step += 1
            losses.append(loss_value if applied else math.nan)
            update_data_waits.append(data_wait)
            if applied and on_update is not None:
                try:
                    on_update(state.step, loss_value)
                except StopTraining:
                    break

            # ------------------------------------------------------------ log
            if applied:
                # The objective's own scalars (e.g. the share of active triplets) of the update's last
                # micro-batch, read only on the steps that write a line.
                logger.update(state.step, loss_value, lr, data_wait_s=data_wait, grad_norm=norm_value,
                              epoch=state.epoch, extra=objective.log_values() if logger.logs_at(state.step)
                              else None)

            # ------------------------------------------------------------ verify
            if packs and state.step % cfg.eval.every == 0:
                verification = _verify(cfg, packs, model, ctx)
                if rank == 0:
                    _record_verification(cfg, verification, state, backbone, logger, output_dir)
                logger.restart_window(state.step)

            # ------------------------------------------------------------ checkpoint
            stopped_by = stop.agreed(world_size, device)
            periodic = cfg.output.checkpoint_every > 0 and state.step % cfg.output.checkpoint_every == 0
            if periodic or stopped_by is not None or state.step == stop_at:
                last_checkpoint = _checkpoint(cfg, state, loader, scaler, backbone, optimizer, objective,
                                              objective_optimizer, ctx, checkpoints_dir, logger)
            if stopped_by is not None:
                logger.info(f"received {signal.Signals(stopped_by).name}: checkpoint written at step "
                            f"{state.step}; stopping (resume with output.resume=auto)")
                break
        if state.step >= stop_at and (last_checkpoint is None or not last_checkpoint.name.endswith(
                f"{state.step:08d}")):
            # Resumed a run that was already at its end: still leave a final checkpoint behind.
            last_checkpoint = _checkpoint(cfg, state, loader, scaler, backbone, optimizer, objective,
                                          objective_optimizer, ctx, checkpoints_dir, logger)
        if rank == 0 and last_checkpoint is not None and state.step >= stop_at:
            logger.info(_next_commands(cfg, output_dir))
    finally:
        stop.uninstall()
        logger.close()
        loader_close = getattr(loader, "close", None)
        if loader_close is not None:
            loader_close()

    return {"step": state.step, "total_steps": total_steps, "epoch": state.epoch, "losses": losses,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "resumed_from": resume_path or None,
            "stopped_by": stopped_by, "nonfinite_total": state.nonfinite_total,
            "verification": {name: r.to_dict() for name, r in verification.items()}, "best": state.best,
            "world_size": world_size, "loop_seconds": time.perf_counter() - loop_started,
            "data_wait_seconds": float(getattr(loader, "total_wait_seconds", 0.0)),
            "update_data_wait_seconds": update_data_waits}


class _NullStream:
    """Console of a quiet run: lines still reach train.log through the logger's file."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _next_commands(cfg: TrainConfig, output_dir: Path) -> str:
    """What a user does with a finished run: evaluate and export it."""
    packs = " ".join(f"--bin {pack}" for pack in cfg.eval.bins) or "--bin lfw.bin --bin cfp_fp.bin"
    return (f"next:\n  arcface-eval --model {output_dir} {packs} --output {output_dir / 'eval'}\n"
            f"  arcface-export --model {output_dir} --output {output_dir / 'export'}")


def _build_loader(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> Any:
    from arcface.data import build_train_loader

    return build_train_loader(cfg, rank, world_size, device)


def _load_packs(cfg: TrainConfig, rank: int) -> list[Any]:
    """The verification packs (only where they are used: rank 0, or every rank when spread)."""
    from eval.verification import load_pack

    if not (cfg.eval.distributed or rank == 0):
        # Other ranks still need the pack names to stay in step; the packs' images are not needed.
        return [_PackPlaceholder(Path(p).stem) for p in cfg.eval.bins]
    return [load_pack(path) for path in cfg.eval.bins]


class _PackPlaceholder:
    def __init__(self, name: str) -> None:
        self.name = name


def _record_verification(cfg: TrainConfig, results: dict[str, Any], state: TrainingState, backbone: nn.Module,
                         logger: MetricLogger, output_dir: Path) -> None:
    """Log the accuracies (rank 0) and keep the backbone of the best mean accuracy in ``output/best``."""
    for name, result in results.items():
        logger.info(f"step {state.step} verification {result.summary()}")
        logger.scalars(state.step, {f"verify/{name}/accuracy": result.accuracy_mean,
                                    f"verify/{name}/val_at_far_1e-3": result.val_at_far_1e3})
    if not results:
        return
    mean_accuracy = sum(r.accuracy_mean for r in results.values()) / len(results)
    logger.scalars(state.step, {"verify/mean_accuracy": mean_accuracy})
    # A collapsed model (every pair at the same distance) scores chance with zero spread: never "best".
    if any(r.collapsed for r in results.values()) or mean_accuracy <= state.best.get("value", -math.inf):
        return
    state.best = {"metric": "mean_accuracy", "value": mean_accuracy, "step": state.step,
                  "accuracies": {name: r.accuracy_mean for name, r in results.items()}}
    save_backbone_checkpoint(output_dir / BEST_DIR, unwrap_model(backbone), cfg.to_dict(), step=state.step)
    tmp = output_dir / f".{BEST_FILE}.tmp"
    tmp.write_text(json.dumps(state.best, indent=2) + "\n")
    tmp.replace(output_dir / BEST_FILE)
    logger.info(f"step {state.step}: new best mean verification accuracy {mean_accuracy:.5f} -> "
                f"{output_dir / BEST_DIR}")


def _checkpoint(cfg: TrainConfig, state: TrainingState, loader: Any, scaler: torch.amp.GradScaler,
                backbone: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                objective_optimizer: torch.optim.Optimizer | None, ctx: DistContext, checkpoints_dir: Path,
                logger: MetricLogger) -> Path:
    """Collective checkpoint of everything (every rank), then rank 0 prunes to the last K."""
    started = time.perf_counter()
    state.loader = loader.state_dict()
    state.scaler = scaler.state_dict() if scaler.is_enabled() else {}
    path = save_training_checkpoint(checkpoints_dir, state, backbone=backbone, optimizer=optimizer,
                                    objective=objective, objective_optimizer=objective_optimizer,
                                    config=cfg.to_dict(), rank=ctx.rank,
                                    world_size=ctx.world_size, device=ctx.device)
    if ctx.rank == 0:
        prune_checkpoints(checkpoints_dir, cfg.output.keep_last)
    logger.info(f"step {state.step}: checkpoint {path} ({time.perf_counter() - started:.1f} s)")
    logger.restart_window(state.step)
    return path


def _prog() -> str:
    """The command the user typed, for messages: ``arcface-train`` for the console script, ``python -m
    arcface.train`` when run as a module (also under torchrun), ``./run.sh train`` under the launcher."""
    if os.environ.get(LAUNCHER_ENV) == "1":
        return LAUNCHER_PROG
    return "arcface-train" if Path(sys.argv[0]).name == "arcface-train" else "python -m arcface.train"


def build_arg_parser(prog: str) -> argparse.ArgumentParser:
    """The training command line (shared with the launcher, ``arcface.launch``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a face-recognition backbone with ArcFace and a sharded Partial FC. Launch with "
                    "torchrun for several processes (see docs/training.md).",
        epilog="example: %(prog)s configs/ms1mv2_r100.toml data.rec=/data/faces_emore runtime.amp=bf16")
    parser.add_argument("config", nargs="?",
                        help="recipe: a .toml/.json path or a name from configs/ (e.g. ms1mv2_r100)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides of the recipe, e.g. fc.sample_rate=0.1 optim.lr=0.2")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop (with a checkpoint) after this many updates in total, without changing "
                             "the schedule (e.g. to fit a job's time slot; resume later)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only warnings and errors (train.log and TensorBoard still get "
                             "everything)")
    parser.add_argument("--from-insightface-config", metavar="FILE", default=None,
                        help="print an arcface_torch config file (configs/*.py, read, never executed) as a "
                             "TOML recipe of this trainer, list what was not translated, and exit")
    parser.add_argument("--insightface-gpus", type=int, default=8, metavar="N",
                        help="with --from-insightface-config: the GPU count the arcface_torch config's lr "
                             "was meant for (default 8)")
    return parser


def _report_error(message: str) -> None:
    """A known error (bad data, config or checkpoint) as one line. Under the launcher it goes to
    torchrun's per-worker error file, and the launcher prints each distinct message once."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHER_ENV) == "1" and error_file:
        Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        return
    rank = os.environ.get("RANK")
    print(f"{_prog()}{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)


def parse_command(prog: str, argv: list[str] | None, report_error: Callable[[str], None]
                  ) -> tuple[argparse.Namespace, TrainConfig | None] | None:
    """The command line and the config it names (None with ``--from-insightface-config``, which needs
    none); None (after the usage or ``report_error(message)``) when either is unusable: the caller exits
    with status 2."""
    parser = build_arg_parser(prog)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help(sys.stderr)
        return None
    # Intermixed: options may come between the overrides (``RECIPE -q k=v``), as users type them.
    args = parser.parse_intermixed_args(argv)
    if args.from_insightface_config is not None:
        return args, None
    if args.config is None:
        parser.print_usage(sys.stderr)
        report_error("a recipe is required: a .toml/.json path or a name from configs/")
        return None
    try:
        return args, load_config(args.config, args.overrides)
    except ValueError as exc:
        report_error(str(exc))
        return None


def run_translation(args: argparse.Namespace) -> int:
    """``--from-insightface-config``: print the recipe translated from an arcface_torch config."""
    from arcface.interop.insightface_config import main as translate_insightface_config

    return translate_insightface_config(args.from_insightface_config, gpus=args.insightface_gpus)


def main(argv: list[str] | None = None) -> int:
    """``arcface-train`` / ``[torchrun] python -m arcface.train``: returns the process exit code (0 done,
    1 failed while running, 2 bad command line or config, 128 + N stopped by signal N)."""
    parsed = parse_command(_prog(), argv, _report_error)
    if parsed is None:
        return 2
    args, cfg = parsed
    if cfg is None:
        return run_translation(args)
    try:
        summary = train(cfg, max_steps=args.max_steps, quiet=args.quiet)
    except (ValueError, CheckpointError, NonFiniteLossError, FileNotFoundError) as exc:
        # Bad data, config or checkpoint: a clear message instead of a traceback.
        _report_error(str(exc))
        return 1
    finally:
        destroy_distributed()
    if summary["stopped_by"] is not None:
        return 128 + int(summary["stopped_by"])  # the shell convention for "ended by signal N"
    return 0


if __name__ == "__main__":
    sys.exit(main())
