"""The training loop against independent references: one process with batch B, uninterrupted runs.

Models here are tiny and deterministic on CPU. The multi-process equivalence needs a backbone whose
output for a sample does not depend on the other samples of its batch: BatchNorm in training mode
normalises with per-batch statistics, so 2 ranks x B/2 and 1 rank x B would legitimately differ.
:class:`TinyNet` (average pooling + linear, no BN, no dropout) has no such coupling; with it, the
only thing that can make W=2 differ from W=1 is the trainer (data split, gradient scaling, FC sharding,
checkpoint resharding), which is what these tests check. The single-process resume test uses the BN
variant, so BN running statistics are covered by the checkpoint too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.dist_utils import run_distributed  # noqa: E402


class TinyNet(nn.Module):
    """112x112 RGB -> 8x8 average pool -> linear embedding (optionally followed by BatchNorm1d)."""

    def __init__(self, embedding_size: int, batchnorm: bool = False) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(14)
        self.fc = nn.Linear(3 * 8 * 8, embedding_size)
        self.bn = nn.BatchNorm1d(embedding_size) if batchnorm else nn.Identity()
        self.poison_forwards = 0  # set by a test: that many next forwards return NaN

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.fc(self.pool(images).flatten(1) * 8.0))
        if self.poison_forwards > 0:
            self.poison_forwards -= 1
            return out * math.nan
        return out


class TinyBlock(nn.Module):
    """A per-sample residual unit (Linear -> PReLU, optionally BatchNorm1d first)."""

    def __init__(self, width: int, batchnorm: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.fc = nn.Linear(width, width)
        self.act = nn.PReLU(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.bn(x)))


class TinyBlockNet(TinyNet):
    """TinyNet followed by three repeated units, declared for regional compilation."""

    repeated_blocks = (TinyBlock,)

    def __init__(self, embedding_size: int, batchnorm: bool = False) -> None:
        super().__init__(embedding_size, batchnorm)
        self.units = nn.Sequential(*(TinyBlock(embedding_size, batchnorm) for _ in range(3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.units(super().forward(images))


def tiny_factory(cfg) -> nn.Module:  # noqa: ANN001
    return TinyNet(cfg.backbone.embedding_size)


def tiny_bn_factory(cfg) -> nn.Module:  # noqa: ANN001
    return TinyNet(cfg.backbone.embedding_size, batchnorm=True)


def tiny_blocks_factory(cfg) -> nn.Module:  # noqa: ANN001
    return TinyBlockNet(cfg.backbone.embedding_size)


def tiny_blocks_bn_factory(cfg) -> nn.Module:  # noqa: ANN001
    return TinyBlockNet(cfg.backbone.embedding_size, batchnorm=True)


def make_cfg(out: Path, batch_size: int, *extra: str):  # noqa: ANN201
    from arcface.config import load_config

    return load_config(None, [
        "data.synthetic=true", "data.synthetic_num_images=96", "data.num_classes=13", "data.num_workers=0",
        "backbone.embedding_size=16", "loss.margin=cosface", "loss.m2=0.0", "loss.m3=0.2", "loss.scale=16",
        "optim.lr=0.2", "optim.base_batch_size=12", "optim.grad_clip=0",
        "schedule.total_steps=6", "schedule.warmup_steps=2",
        f"runtime.batch_size={batch_size}", "runtime.device=cpu", "runtime.log_every=1",
        "eval.every=0", f"output.dir={out}", "output.checkpoint_every=100", "output.tensorboard=false",
        *extra])


def global_fc(checkpoint: Path) -> torch.Tensor:
    """The whole FC matrix of a checkpoint: its shards concatenated in class order."""
    from arcface.head.shard_checkpoint import list_fc_shards

    return torch.cat([torch.load(p, weights_only=True)["weight"] for p in list_fc_shards(checkpoint)])


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "backbone.pt", weights_only=True)


# -- distributed workers (module level: they are pickled by name into spawned processes) ---------------

def _w2_train_in_two_halves(rank: int, world_size: int, out: str) -> dict:
    """W=2, 6 rank-local samples each: 3 updates, stop (checkpoint), resume, 3 more."""
    from arcface.train import train

    cfg = make_cfg(Path(out), 6)
    first = train(cfg, max_steps=3, backbone_factory=tiny_factory)
    second = train(cfg, backbone_factory=tiny_factory)
    return {"losses": first["losses"] + second["losses"], "first_ckpt": first["checkpoint"],
            "resumed_from": second["resumed_from"], "final": second["checkpoint"]}


def _w3_load_then_continue(rank: int, world_size: int, out: str) -> dict:
    """W=3: load the W=2 step-3 checkpoint directly (FC rows of this rank), then continue training."""
    from arcface.objectives import build_objective
    from arcface.optim import build_backbone_optimizer
    from arcface.train import train
    from arcface.train_state import find_resume_checkpoint, load_training_checkpoint

    cfg = make_cfg(Path(out), 4)
    net = tiny_factory(cfg)
    objective = build_objective(cfg, 13, rank, world_size, torch.device("cpu"))
    pfc = objective.pfc
    fc_opt = objective.build_optimizer(cfg, 0.1)
    state, meta = load_training_checkpoint(find_resume_checkpoint("auto", out), backbone=net,
                                           optimizer=build_backbone_optimizer(cfg, net), objective=objective,
                                           objective_optimizer=fc_opt, rank=rank, world_size=world_size)
    rows = pfc.weight.detach().clone()
    momentum = fc_opt.state[pfc.weight]["momentum_buffer"].clone()
    summary = train(cfg, backbone_factory=tiny_factory)
    return {"rows": rows, "momentum": momentum, "step": state.step, "resharded": meta["resharded"],
            "losses": summary["losses"], "resumed_from": summary["resumed_from"]}


def _w2_compiled_blocks(rank: int, world_size: int, out: str) -> dict:
    """W=2, 6 rank-local samples each, repeated units compiled in place inside DDP (aot_eager)."""
    from arcface.train import train

    cfg = make_cfg(Path(out), 6, "runtime.compile=true", "runtime.compile_backend=aot_eager",
                   "runtime.compile_scope=blocks")
    summary = train(cfg, backbone_factory=tiny_blocks_factory)
    return {"losses": summary["losses"], "final": summary["checkpoint"]}


# -- tests --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, batch 12, 6 uninterrupted updates: the reference every other run must reproduce."""
    from arcface.train import train

    out = tmp_path_factory.mktemp("ref")
    cfg = make_cfg(out, 12, "output.checkpoint_every=3")
    summary = train(cfg, backbone_factory=tiny_factory)
    assert summary["step"] == 6 and len(summary["losses"]) == 6
    assert all(math.isfinite(v) for v in summary["losses"])
    # The losses must vary (random labels on noise images: they need not fall in 6 updates), or
    # equality between runs would prove little.
    assert max(summary["losses"]) - min(summary["losses"]) > 0.1
    return {"out": out, **summary}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_reshard_to_three_and_one(reference: dict, tmp_path: Path) -> None:
    ref_losses = torch.tensor(reference["losses"], dtype=torch.float64)
    ref_final = Path(reference["checkpoint"])

    # W=2 x 6 == W=1 x 12, across a stop/resume in the middle.
    w2_out = tmp_path / "w2"
    results = run_distributed(_w2_train_in_two_halves, 2, args=(str(w2_out),), timeout_s=240)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64), ref_losses,
                                   rtol=1e-5, atol=1e-6)
        assert r["resumed_from"] == r["first_ckpt"]
    final = Path(results[0]["final"])
    # Float sums in another order over 6 updates (lr 0.2, no clipping): a few 1e-6 of drift.
    torch.testing.assert_close(global_fc(final), global_fc(ref_final), rtol=1e-4, atol=2e-5)
    for key, value in backbone_state(ref_final).items():
        torch.testing.assert_close(backbone_state(final)[key], value, rtol=1e-4, atol=2e-5)
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2

    # The step-3 checkpoint saved by W=2 is resumed on W=3 and on W=1 (copies: each run writes into its own).
    step3 = w2_out / "checkpoints" / "step_00000003"
    saved_fc = global_fc(step3)
    for name in ("w3", "w1"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(step3, tmp_path / name / "checkpoints" / step3.name)

    w3 = run_distributed(_w3_load_then_continue, 3, args=(str(tmp_path / "w3"),), timeout_s=240)
    torch.testing.assert_close(torch.cat([r["rows"] for r in w3]), saved_fc, rtol=0, atol=0)
    saved_momentum = torch.cat([torch.load(p, weights_only=True)["optimizer"]["row_state"]["momentum_buffer"]
                                for p in sorted(step3.glob("fc_shard_*.pt"))])
    torch.testing.assert_close(torch.cat([r["momentum"] for r in w3]), saved_momentum, rtol=0, atol=0)
    for r in w3:
        assert r["step"] == 3 and r["resharded"]
        # Same global batch (3 x 4) from the same sampler position: the continuation equals the reference.
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64), ref_losses[3:],
                                   rtol=1e-5, atol=1e-6)

    from arcface.train import train

    w1 = train(make_cfg(tmp_path / "w1", 12), backbone_factory=tiny_factory)
    assert w1["resumed_from"].endswith("step_00000003")
    torch.testing.assert_close(torch.tensor(w1["losses"], dtype=torch.float64), ref_losses[3:],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_with_compiled_blocks_equal_one_eager_rank(tmp_path: Path) -> None:
    """DDP around a backbone whose units are compiled in place: the same losses and weights as one eager
    process with the whole batch, and the checkpoint keys of the plain network."""
    from arcface.train import train

    reference = train(make_cfg(tmp_path / "eager", 12), backbone_factory=tiny_blocks_factory)
    results = run_distributed(_w2_compiled_blocks, 2, args=(str(tmp_path / "w2"),), timeout_s=240)
    ref_state = backbone_state(Path(reference["checkpoint"]))
    for r in results:
        # The rank-local sums of DDP's gradient average differ in order from the single process's sums.
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64),
                                   torch.tensor(reference["losses"], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    state = backbone_state(Path(results[0]["final"]))
    assert sorted(state) == sorted(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=2e-5, msg=key)


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path: Path) -> None:
    """BN backbone, sampled FC (negative-sampler RNG), accumulation 2: stop by SIGTERM at step 2, resume."""
    from arcface.train import train

    extra = ("fc.sample_rate=0.5", "optim.accumulation_steps=2", "runtime.batch_size=6", "optim.grad_clip=5")
    full = train(make_cfg(tmp_path / "full", 6, *extra), backbone_factory=tiny_bn_factory)

    def preempt(step: int, loss: float) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "cut"
    first = train(make_cfg(out, 6, *extra), backbone_factory=tiny_bn_factory, on_update=preempt)
    assert first["stopped_by"] == signal.SIGTERM and first["step"] == 2
    assert first["checkpoint"].endswith("step_00000002")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back
    second = train(make_cfg(out, 6, *extra), backbone_factory=tiny_bn_factory)
    assert second["resumed_from"] == first["checkpoint"]
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(full["losses"]),
                               rtol=0, atol=0)
    a, b = backbone_state(Path(full["checkpoint"])), backbone_state(Path(second["checkpoint"]))
    assert set(a) == set(b) and "bn.running_mean" in a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    torch.testing.assert_close(global_fc(Path(second["checkpoint"])), global_fc(Path(full["checkpoint"])),
                               rtol=0, atol=0)
    # Outputs a user relies on.
    assert (out / "config.json").is_file() and "resumed from" in (out / "train.log").read_text()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nonfinite_loss_skipped_then_stops(tmp_path: Path) -> None:
    from arcface.train import NonFiniteLossError, train

    nets: list[TinyNet] = []

    def factory(cfg) -> nn.Module:  # noqa: ANN001
        nets.append(TinyNet(cfg.backbone.embedding_size))
        return nets[-1]

    def poison_once(step: int, loss: float) -> None:
        if step == 2:
            nets[-1].poison_forwards = 1  # the 3rd update sees NaN embeddings, the 4th is clean again

    summary = train(make_cfg(tmp_path / "once", 12, "runtime.max_nonfinite_steps=2"),
                    backbone_factory=factory, on_update=poison_once)
    assert summary["step"] == 6 and summary["nonfinite_total"] == 1
    assert math.isnan(summary["losses"][2]) and all(math.isfinite(v) for i, v in enumerate(summary["losses"])
                                                    if i != 2)

    def poison_forever(step: int, loss: float) -> None:
        nets[-1].poison_forwards = 10**6

    with pytest.raises(NonFiniteLossError, match="runtime.max_nonfinite_steps = 2"):
        train(make_cfg(tmp_path / "always", 12, "runtime.max_nonfinite_steps=2"), backbone_factory=factory,
              on_update=poison_forever)
    # The skipped updates never reached the weights.
    assert all(torch.isfinite(p).all() for p in nets[-1].parameters())


def test_checkpoint_errors_name_the_file_and_pruning(reference: dict, tmp_path: Path) -> None:
    from arcface.checkpoint import CheckpointError, save_backbone_checkpoint
    from arcface.objectives import build_objective
    from arcface.optim import build_backbone_optimizer
    from arcface.train_state import find_resume_checkpoint, load_training_checkpoint, prune_checkpoints

    cfg = make_cfg(tmp_path, 12)
    cpu = torch.device("cpu")

    def load(path: Path) -> None:
        net = tiny_factory(cfg)
        objective = build_objective(cfg, 13, 0, 1, cpu)
        load_training_checkpoint(path, backbone=net, optimizer=build_backbone_optimizer(cfg, net),
                                 objective=objective, objective_optimizer=objective.build_optimizer(cfg, 0.1))

    good = Path(reference["checkpoint"])
    broken = tmp_path / "broken" / good.name
    shutil.copytree(good, broken)
    (broken / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: cannot load"):
        load(broken)
    (broken / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: missing"):
        load(broken)
    backbone_only = save_backbone_checkpoint(tmp_path / "bb", tiny_factory(cfg), cfg.to_dict(), step=1)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load(backbone_only)
    wrong_size = make_cfg(tmp_path, 12, "backbone.embedding_size=8")
    net = tiny_factory(wrong_size)
    with pytest.raises(CheckpointError, match=r"backbone\.pt: does not fit"):
        objective = build_objective(wrong_size, 13, 0, 1, cpu)
        load_training_checkpoint(good, backbone=net, optimizer=build_backbone_optimizer(wrong_size, net),
                                 objective=objective,
                                 objective_optimizer=objective.build_optimizer(wrong_size, 0.1))
    with pytest.raises(CheckpointError, match="output.resume"):
        find_resume_checkpoint(str(tmp_path / "nowhere"), tmp_path)
    assert find_resume_checkpoint("none", reference["out"]) is None
    assert find_resume_checkpoint("auto", reference["out"]) == good
    assert find_resume_checkpoint(str(reference["out"]), tmp_path) == good

    # Pruning keeps the newest K complete checkpoints and removes debris of crashed saves.
    ckpts = tmp_path / "prune"
    for step in (1, 2, 3, 4):
        (ckpts / f"step_{step:08d}").mkdir(parents=True)
        (ckpts / f"step_{step:08d}" / "meta.json").write_text("{}")
    (ckpts / ".tmp-step_00000005-abcd1234").mkdir()
    (ckpts / "step_00000009").mkdir()  # no meta.json: incomplete, never counted as a checkpoint
    prune_checkpoints(ckpts, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003", "step_00000004", "step_00000009"]


def test_bf16_autocast_tracks_the_fp32_run(tmp_path: Path) -> None:
    """Backbone under bf16 autocast, Partial FC in fp32: the losses follow the fp32 run of the same config
    within bf16 rounding, across a stop and resume."""
    from arcface.train import train

    reference = train(make_cfg(tmp_path / "fp32", 6), backbone_factory=tiny_factory)
    out = tmp_path / "bf16"
    first = train(make_cfg(out, 6, "runtime.amp=bf16"), max_steps=3, backbone_factory=tiny_factory)
    second = train(make_cfg(out, 6, "runtime.amp=bf16"), backbone_factory=tiny_factory)
    losses = torch.tensor(first["losses"] + second["losses"])
    assert second["resumed_from"] == first["checkpoint"]
    assert torch.isfinite(losses).all() and second["nonfinite_total"] == 0
    torch.testing.assert_close(losses, torch.tensor(reference["losses"]), rtol=0.05, atol=0.05)


def test_fp16_grad_scaler_skips_overflows_then_trains(tmp_path: Path) -> None:
    """fp16 autocast with the grad scaler: updates whose scaled gradients overflow are skipped (recorded as
    NaN, not counted as non-finite losses) while the scale drops; then updates apply, and the scaler's
    state survives a resume."""
    from arcface.train import train

    out = tmp_path / "fp16"
    # Sampled FC with the sparse update: the scaler unscales and steps a sparse COO gradient too.
    cfg = make_cfg(out, 6, "runtime.amp=fp16", "schedule.total_steps=12", "fc.sample_rate=0.5")
    first = train(cfg, max_steps=6, backbone_factory=tiny_factory)
    second = train(cfg, backbone_factory=tiny_factory)
    losses = first["losses"] + second["losses"]
    applied = [v for v in losses if math.isfinite(v)]
    assert second["resumed_from"] == first["checkpoint"]
    assert first["nonfinite_total"] == 0 and second["nonfinite_total"] == 0
    assert len(applied) >= 6  # the scale settled within the first half
    assert all(math.isfinite(v) for v in second["losses"])  # restored scale: no new overflow bursts


def test_adamw_and_dense_fc_update_train(tmp_path: Path) -> None:
    """AdamW for backbone and FC with the dense FC update and sampling: every FC row moves each step
    (dense, weight decay on all rows), across a resume, with finite losses."""
    from arcface.train import train

    out = tmp_path / "adamw"
    extra = ("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05", "fc.update=dense",
             "fc.sample_rate=0.5")
    start = train(make_cfg(out, 6, *extra), max_steps=1, backbone_factory=tiny_factory)
    fc_after_one = global_fc(Path(start["checkpoint"]))
    final = train(make_cfg(out, 6, *extra), backbone_factory=tiny_factory)
    fc_final = global_fc(Path(final["checkpoint"]))
    # Dense AdamW with weight decay changes every row, sampled this step or not.
    assert bool(((fc_final - fc_after_one).abs().sum(dim=1) > 0).all())
    assert final["resumed_from"] == start["checkpoint"]
    assert all(math.isfinite(v) for v in start["losses"] + final["losses"])


@pytest.mark.parametrize("backend, scope", [
    ("aot_eager", "model"), ("aot_eager", "blocks"),
    pytest.param("inductor", "model", marks=pytest.mark.slow),
])
def test_torch_compile_in_the_loop_tracks_the_eager_run(tmp_path: Path, backend: str, scope: str) -> None:
    """runtime.compile: the compiled backbone (whole, or its repeated units compiled in place) trains like
    the eager one (same losses, same weights, BN statistics included), across a stop and resume;
    checkpoints hold the plain network's keys (no compile wrapper prefix)."""
    from arcface.train import train

    factory = tiny_bn_factory if scope == "model" else tiny_blocks_bn_factory
    reference = train(make_cfg(tmp_path / "eager", 6), backbone_factory=factory)
    out = tmp_path / backend
    extra = ("runtime.compile=true", f"runtime.compile_backend={backend}", f"runtime.compile_scope={scope}")
    first = train(make_cfg(out, 6, *extra), max_steps=3, backbone_factory=factory)
    second = train(make_cfg(out, 6, *extra), backbone_factory=factory)
    assert second["resumed_from"] == first["checkpoint"]
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]),
                               torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
    compiled_state = backbone_state(Path(second["checkpoint"]))
    eager_state = backbone_state(Path(reference["checkpoint"]))
    assert sorted(compiled_state) == sorted(eager_state)
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fp16_init_scale_sets_where_the_grad_scaler_starts(tmp_path: Path) -> None:
    """runtime.fp16_init_scale is the scaler's first scale: at 2**40 the first scaled gradients overflow
    fp16 (max 65504) and those updates are skipped; at 1 none is."""
    from arcface.train import train

    huge = train(make_cfg(tmp_path / "huge", 6, "runtime.amp=fp16", "runtime.fp16_init_scale=1099511627776"),
                 backbone_factory=tiny_factory)
    one = train(make_cfg(tmp_path / "one", 6, "runtime.amp=fp16", "runtime.fp16_init_scale=1"),
                backbone_factory=tiny_factory)
    assert math.isnan(huge["losses"][0])
    assert all(math.isfinite(v) for v in one["losses"])


def test_stop_training_from_the_hook_ends_the_loop_without_a_checkpoint(tmp_path: Path) -> None:
    """A hook raising StopTraining ends the run after that update: no checkpoint, the summary as usual,
    with the data wait of each update."""
    from arcface.train import StopTraining, train

    seen: list[int] = []

    def stop_after_three(step: int, loss: float) -> None:
        seen.append(step)
        if step == 3:
            raise StopTraining

    out = tmp_path / "stopped"
    summary = train(make_cfg(out, 6), backbone_factory=tiny_factory, on_update=stop_after_three)
    assert seen == [1, 2, 3] and summary["step"] == 3 and len(summary["losses"]) == 3
    assert summary["checkpoint"] is None and not (out / "checkpoints").exists()
    waits = summary["update_data_wait_seconds"]
    assert len(waits) == 3 and all(w >= 0 for w in waits)
    assert sum(waits) == pytest.approx(summary["data_wait_seconds"])
