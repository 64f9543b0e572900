"""Continuing an arcface_torch run (output.resume_from_insightface) against the run arcface_torch saved.

The reference is tests/data/insightface_golden/pfc_run_w2: two ranks of arcface_torch's training code
(PartialFC_V2, one SGD over [backbone, partial fc], PolynomialLRWarmup(warmup_iters=2, total_iters=10)),
3 steps, saved by its train_v2.py. The run is continued here on 1, 2 and 3 ranks.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arcface.checkpoint import CheckpointError  # noqa: E402
from backbones.insightface import insightface_to_registry_key  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.insightface_fixtures import PFC_RUN  # noqa: E402

NUM_CLASSES, EMBEDDING_SIZE, GLOBAL_BATCH = 1001, 64, 12
# The run's LR after its 3 updates, as its scheduler saved it: warmup 2, then 0.1 * (1 - (3 - 2) / (10 - 2)).
NEXT_LR = 0.1 * (1 - (3 - 2) / (10 - 2))


def resume_overrides(out: Path, world_size: int, *extra: str) -> list[str]:
    """The run's settings in this trainer's keys (what --from-insightface-config and the import's errors
    name), continued at the run's global batch on ``world_size`` ranks."""
    return ["data.synthetic=true", "data.synthetic_num_images=48", f"data.num_classes={NUM_CLASSES}",
            "data.num_workers=0", "backbone.name=mobilefacenet", f"backbone.embedding_size={EMBEDDING_SIZE}",
            "backbone.width=1", "backbone.blocks=[1,1,1,1]", "loss.margin=arcface", "loss.scale=64",
            "loss.m2=0.5", "fc.sample_rate=0.5", "fc.update=dense", "optim.lr=0.1",
            f"optim.base_batch_size={GLOBAL_BATCH}", "optim.momentum=0.9", "optim.weight_decay=5e-4",
            "schedule.total_steps=10", "schedule.warmup_steps=2", "schedule.power=1.0",
            f"runtime.batch_size={GLOBAL_BATCH // world_size}", "runtime.device=cpu", "runtime.log_every=1",
            "eval.every=0", f"output.dir={out}", "output.tensorboard=false",
            f"output.resume_from_insightface={PFC_RUN}", *extra]


def fixture_run() -> dict[str, torch.Tensor | dict]:
    """The saved run read directly: the global FC matrix and momentum (ranks in order), rank 0's backbone."""
    ranks = [torch.load(PFC_RUN / f"checkpoint_gpu_{r}.pt", weights_only=True) for r in range(2)]
    fc_index = ranks[0]["state_optimizer"]["param_groups"][1]["params"][0]
    return {"weight": torch.cat([c["state_dict_softmax_fc"]["weight"] for c in ranks]),
            "momentum": torch.cat([c["state_optimizer"]["state"][fc_index]["momentum_buffer"]
                                   for c in ranks]),
            "backbone": ranks[0]["state_dict_backbone"], "optimizer": ranks[0]["state_optimizer"]}


def _shards(checkpoint: Path) -> list[dict]:
    from arcface.head.shard_checkpoint import list_fc_shards

    return [torch.load(p, weights_only=True) for p in list_fc_shards(checkpoint)]


def _resume(rank: int, world_size: int, out: str) -> dict:
    """Continue the run for one update on this world size, then read back what the resume loaded."""
    from arcface.config import load_config
    from arcface.objectives import build_objective
    from arcface.optim import build_backbone_optimizer
    from arcface.train import _build_backbone, train
    from arcface.train_state import load_training_checkpoint

    cfg = load_config(None, resume_overrides(Path(out), world_size))
    summary = train(cfg, max_steps=4)
    # What this rank's rows are after loading the imported checkpoint (a fresh FC of this world size).
    objective = build_objective(cfg, NUM_CLASSES, rank, world_size, torch.device("cpu"))
    pfc, fc_optimizer = objective.pfc, objective.build_optimizer(cfg, 0.1)
    backbone = _build_backbone(cfg)
    state, meta = load_training_checkpoint(Path(out) / "checkpoints" / "step_00000003", backbone=backbone,
                                           optimizer=build_backbone_optimizer(cfg, backbone),
                                           objective=objective, objective_optimizer=fc_optimizer, rank=rank,
                                           world_size=world_size)
    return {"rows": pfc.weight.detach().clone(),
            "momentum": fc_optimizer.state[pfc.weight]["momentum_buffer"], "step": state.step,
            "epoch": state.epoch, "resharded": meta["resharded"], "summary_step": summary["step"],
            "losses": summary["losses"], "checkpoint": summary["checkpoint"]}


def _check_continuation(out: Path, results: list[dict], world_size: int, saved: dict) -> None:
    # What each rank loaded, in rank order, is the run's global FC matrix and momentum, bit for bit.
    assert torch.equal(torch.cat([r["rows"] for r in results]), saved["weight"])
    assert torch.equal(torch.cat([r["momentum"] for r in results]), saved["momentum"])
    for r in results:
        assert (r["step"], r["epoch"], r["summary_step"]) == (3, 1, 4)
        assert r["resharded"] is (world_size != 2)
        assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0])
    # The imported checkpoint itself holds them too (in the run's own 2-shard layout).
    step3, step4 = out / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000004"
    shards3, shards4 = _shards(step3), _shards(step4)
    assert [s["num_local"] for s in shards3] == [501, 500]
    weight3 = torch.cat([s["weight"] for s in shards3])
    momentum3 = torch.cat([s["optimizer"]["row_state"]["momentum_buffer"] for s in shards3])
    assert torch.equal(weight3, saved["weight"]) and torch.equal(momentum3, saved["momentum"])
    # One more SGD update ran with the saved schedule's next LR and the saved momentum:
    # every row w4 = w3 - lr * m4 (dense update), and where a row got no gradient (not sampled),
    # m4 = 0.9 m3 + wd w3 exactly: the momentum continued rather than restarting.
    weight4 = torch.cat([s["weight"] for s in shards4])
    momentum4 = torch.cat([s["optimizer"]["row_state"]["momentum_buffer"] for s in shards4])
    torch.testing.assert_close(weight4, weight3 - NEXT_LR * momentum4, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(weight4, weight3 - 0.1 * momentum4, rtol=1e-4, atol=1e-4)
    continued = (momentum4 - (0.9 * momentum3 + 5e-4 * weight3)).abs().amax(dim=1) <= 1e-6
    sampled = sum(math.floor(0.5 * s.num_local) for s in _partitions(world_size))
    assert int(continued.sum()) >= NUM_CLASSES - sampled
    log = (out / "train.log").read_text()
    assert "next learning rate 0.0875, as the run's scheduler saved it" in log
    assert "step 4/10 epoch 1 | loss" in log and "| lr 0.0875 |" in log


def _partitions(world_size: int) -> list:
    from arcface.head.partition import ClassPartition

    return ClassPartition(NUM_CLASSES, world_size, 0).all_ranks()


@pytest.fixture(scope="module")
def saved() -> dict:
    return fixture_run()


def test_import_maps_backbone_and_its_momentum_by_name(tmp_path: Path, saved: dict) -> None:
    from arcface.config import load_config
    from arcface.interop.run_import import import_configured_run

    cfg = load_config(None, resume_overrides(tmp_path, 1))
    note = import_configured_run(cfg, tmp_path / "checkpoints", num_images=48, num_classes=NUM_CLASSES,
                                 loader_state={"epoch": 0, "consumed": 0, "seed": 2048, "num_samples": 48},
                                 rank=0, world_size=1)
    assert "global step 3" in note and "next learning rate 0.0875" in note
    step3 = tmp_path / "checkpoints" / "step_00000003"
    backbone = torch.load(step3 / "backbone.pt", weights_only=True)
    assert len(backbone) == len(saved["backbone"])
    for key, value in saved["backbone"].items():
        assert torch.equal(backbone[insightface_to_registry_key(key, "mobilefacenet")], value), key
    # Momentum of every backbone parameter, found through our optimiser's parameter order.
    from arcface.optim import build_backbone_optimizer
    from arcface.train import _build_backbone

    model = _build_backbone(cfg)
    optimizer = build_backbone_optimizer(cfg, model)
    optimizer.load_state_dict(torch.load(step3 / "optimizer.pt", weights_only=True))
    names = {id(p): n for n, p in model.named_parameters()}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    theirs = [k for k in saved["backbone"] if not k.endswith(buffers)]
    momentum = saved["optimizer"]["state"]
    by_name = {insightface_to_registry_key(k, "mobilefacenet"): momentum[i]["momentum_buffer"]
               for i, k in zip(saved["optimizer"]["param_groups"][0]["params"], theirs)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len(by_name) == 84
    for param in params:
        assert torch.equal(optimizer.state[param]["momentum_buffer"], by_name[names[id(param)]])
    # Imported once: a second call finds this run's checkpoint and leaves it alone.
    again = import_configured_run(cfg, tmp_path / "checkpoints", num_images=48, num_classes=NUM_CLASSES,
                                  loader_state={}, rank=0, world_size=1)
    assert "not read again: resuming" in again


def test_continue_on_one_rank(tmp_path: Path, saved: dict) -> None:
    results = [_resume(0, 1, str(tmp_path))]
    _check_continuation(tmp_path, results, 1, saved)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_continue_on_several_ranks(tmp_path: Path, saved: dict, world_size: int) -> None:
    results = run_distributed(_resume, world_size, args=(str(tmp_path),), timeout_s=300)
    _check_continuation(tmp_path, results, world_size, saved)


# -- what cannot be mapped is refused --------------------------------------------------------------

def _copy_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    for name in ("checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt"):
        shutil.copy(PFC_RUN / name, run / name)
    return run


def _import(tmp_path: Path, run: Path, *extra: str) -> str:
    from arcface.config import load_config
    from arcface.interop.run_import import import_configured_run

    overrides = [o for o in resume_overrides(tmp_path / "out", 1) if not o.startswith("output.resume_from")]
    cfg = load_config(None, [*overrides, f"output.resume_from_insightface={run}", *extra])
    return import_configured_run(cfg, tmp_path / "out" / "checkpoints", num_images=48,
                                 num_classes=NUM_CLASSES,
                                 loader_state={"epoch": 0, "consumed": 0, "seed": 2048, "num_samples": 48},
                                 rank=0, world_size=1)


def _imported(checkpoints: Path) -> bool:
    return checkpoints.exists() and any(checkpoints.iterdir())


def _edit(path: Path, change) -> None:  # noqa: ANN001
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("case,change,message", [
    ("adamw", lambda c: [g.update(betas=(0.9, 0.999)) for g in c["state_optimizer"]["param_groups"]],
     r"checkpoint_gpu_0\.pt: the run used AdamW .*not supported"),
    ("grad scaler", lambda c: c.update(state_amp={"scale": torch.tensor(1024.0)}),
     r"checkpoint_gpu_0\.pt: cannot be continued here: entries 'state_amp'; .*fp16 grad scaler state"),
    ("unknown entry", lambda c: c.update(ema={"w": torch.zeros(1)}),
     r"entries 'ema'; this code does not know what they hold"),
    ("nesterov", lambda c: [g.update(nesterov=True) for g in c["state_optimizer"]["param_groups"]],
     r"SGD nesterov=True in group 0"),
    ("scheduler", lambda c: c.update(state_lr_scheduler={"last_epoch": 3, "base_lrs": [0.1], "T_max": 10}),
     r"unknown LR scheduler state"),
])
def test_unmappable_state_is_refused(tmp_path: Path, case: str, change, message: str) -> None:  # noqa: ANN001
    run = _copy_run(tmp_path)
    _edit(run / "checkpoint_gpu_0.pt", change)
    with pytest.raises(CheckpointError, match=message):
        _import(tmp_path, run)
    assert not _imported(tmp_path / "out" / "checkpoints")


def test_config_mismatches_name_the_settings_to_use(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"set: schedule\.name=polynomial schedule\.total_steps=10 "
                                              r"schedule\.warmup_steps=2 .*schedule\.power=1\.0 .*"
                                              r"optim\.lr=0\.1 "
                                              r"optim\.base_batch_size=12"):
        _import(tmp_path, PFC_RUN, "schedule.power=2.0")
    with pytest.raises(CheckpointError, match=r"Set backbone\.name=mobilefacenet backbone\.embedding_size=64 "
                                              r"backbone\.width=1 backbone\.blocks=\[1,1,1,1\]"):
        _import(tmp_path, PFC_RUN, "backbone.blocks=[1,4,6,2]", "backbone.width=2")
    with pytest.raises(CheckpointError, match=r"SGD weight_decay is 0\.0005 .*optim\.weight_decay=0\.0005"):
        _import(tmp_path, PFC_RUN, "optim.weight_decay=1e-4")
    with pytest.raises(CheckpointError, match=r"1001 classes \(501 \+ 500 rows over 2 ranks\), the data here "
                                              r"has 1000"):
        from arcface.config import load_config
        from arcface.interop.run_import import import_configured_run

        cfg = load_config(None, resume_overrides(tmp_path / "n", 1))
        import_configured_run(cfg, tmp_path / "n" / "checkpoints", num_images=48, num_classes=1000,
                              loader_state={}, rank=0, world_size=1)


def test_missing_and_inconsistent_rank_files(tmp_path: Path) -> None:
    run = _copy_run(tmp_path)
    (run / "checkpoint_gpu_1.pt").rename(run / "checkpoint_gpu_2.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint_gpu_1\.pt missing \(found ranks \[0, 2\]\)"):
        _import(tmp_path, run)
    (run / "checkpoint_gpu_2.pt").rename(run / "checkpoint_gpu_1.pt")
    _edit(run / "checkpoint_gpu_1.pt", lambda c: c.update(global_step=6, epoch=2))
    with pytest.raises(CheckpointError, match=r"checkpoint_gpu_1\.pt: epoch 2, global_step 6; "
                                              r"checkpoint_gpu_0\.pt has 1, 3"):
        _import(tmp_path, run)
    truncated = _copy_run(tmp_path / "t")
    data = (truncated / "checkpoint_gpu_1.pt").read_bytes()
    (truncated / "checkpoint_gpu_1.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"checkpoint_gpu_1\.pt: cannot read as an arcface_torch run"):
        _import(tmp_path, truncated)
    with pytest.raises(CheckpointError, match=r"no checkpoint_gpu_\*\.pt"):
        _import(tmp_path, tmp_path / "t")
    # Nothing half-written is left where a resume would look.
    assert not _imported(tmp_path / "out" / "checkpoints")


def test_stopped_inside_warmup_is_continued_and_says_so(tmp_path: Path) -> None:
    run = _copy_run(tmp_path)

    def to_step_one(c: dict) -> None:  # the same files, as if saved after the first of 2 warmup updates
        c["global_step"] = 1
        c["state_lr_scheduler"]["last_epoch"] = 1
        for group in c["state_optimizer"]["param_groups"]:
            group["lr"] = 0.05

    for rank in (0, 1):
        _edit(run / f"checkpoint_gpu_{rank}.pt", to_step_one)
    note = _import(tmp_path, run)
    assert "stopped inside warmup (update 2 of 2): the remaining warmup updates run 0.05 above" in note
