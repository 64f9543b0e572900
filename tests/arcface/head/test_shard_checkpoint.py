"""FC shard checkpoints: save on W = 2, load on W = 3 and W = 1 -> the same global FC matrix and
optimiser rows, and the next training step is identical whatever the world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.head.shard_checkpoint import FCCheckpointError, load_fc_resharded, save_fc_shard, shard_filename
from tests.dist_utils import run_distributed

NUM_CLASSES, DIM = 13, 6


class _NormFace(nn.Module):
    def forward(self, cos_theta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 16.0 * cos_theta


def _batch(seed: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, DIM, generator=generator)
    return embeddings, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


def _row_state(optimizer: torch.optim.Optimizer, pfc: PartialFC) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in optimizer.state[pfc.weight].items()}


def _train_and_save(rank: int, world_size: int, root: str) -> dict:
    """Two sampled sparse steps with each optimiser on W ranks, then save; returns what was saved."""
    out = {}
    for name in ("sgd", "adamw"):
        part = ClassPartition(NUM_CLASSES, world_size, rank)
        pfc = PartialFC(part, DIM, _NormFace(), sample_rate=0.5, seed=1)
        opt = pfc.build_optimizer(name, lr=0.1, weight_decay=1e-3)
        for step in range(2):
            embeddings, labels = _batch(step, 6)
            batch = 6 // world_size
            opt.zero_grad()
            mine = slice(rank * batch, (rank + 1) * batch)
            pfc(embeddings[mine], labels[mine]).backward()
            opt.step()
        save_fc_shard(Path(root) / name, pfc, opt)
        out[name] = {"weight": pfc.weight.detach().clone(), "state": _row_state(opt, pfc)}
    return out


def _load_and_step(rank: int, world_size: int, root: str) -> dict:
    """Load into a differently initialised FC on W ranks, then one full (unsampled) step."""
    out = {}
    for name in ("sgd", "adamw"):
        pfc = PartialFC(ClassPartition(NUM_CLASSES, world_size, rank), DIM, _NormFace(), seed=99)
        opt = pfc.build_optimizer(name, lr=0.5, weight_decay=0.0)  # hyper-parameters come from the file
        info = load_fc_resharded(Path(root) / name, pfc, opt)
        loaded = {"weight": pfc.weight.detach().clone(), "state": _row_state(opt, pfc), "info": info,
                  "lr": opt.param_groups[0]["lr"]}
        embeddings, labels = _batch(7, 6)
        batch = 6 // world_size
        loss = pfc(embeddings[rank * batch:(rank + 1) * batch], labels[rank * batch:(rank + 1) * batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        out[name] = {**loaded, "loss": loss.item(), "after": pfc.weight.detach().clone()}
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_save_on_two_ranks_resume_on_three_and_one(tmp_path: Path) -> None:
    saved = run_distributed(_train_and_save, 2, (str(tmp_path),), timeout_s=180)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left behind
    on_three = run_distributed(_load_and_step, 3, (str(tmp_path),), timeout_s=180)
    on_one = _load_and_step(0, 1, str(tmp_path))
    for name in ("sgd", "adamw"):
        global_weight = torch.cat([s[name]["weight"] for s in saved])
        keys = sorted(saved[0][name]["state"])
        assert keys == (["momentum_buffer"] if name == "sgd" else ["exp_avg", "exp_avg_sq", "step"])
        global_state = {k: torch.cat([s[name]["state"][k] for s in saved]) for k in keys}
        assert bool((global_state[keys[0]] != 0).any(dim=-1 if keys[0] != "step" else 0).any())
        for layout in (on_three, [on_one]):
            assert torch.equal(torch.cat([r[name]["weight"] for r in layout]), global_weight)
            for k in keys:
                assert torch.equal(torch.cat([r[name]["state"][k] for r in layout]), global_state[k])
            assert all(r[name]["info"] == {"saved_world_size": 2, "resharded": True} for r in layout)
            assert all(r[name]["lr"] == 0.1 for r in layout)
        # Training continues identically on 3 ranks and on 1: same loss, same global matrix after a step.
        assert all(r[name]["loss"] == pytest.approx(on_one[name]["loss"], rel=1e-6) for r in on_three)
        after_three = torch.cat([r[name]["after"] for r in on_three])
        assert torch.allclose(after_three, on_one[name]["after"], rtol=1e-5, atol=1e-6)
        # ... and that step used the restored state: the dense reference with zero momentum differs.
        embeddings, labels = _batch(7, 6)
        weight = global_weight.clone().requires_grad_()
        F.cross_entropy(16.0 * F.linear(F.normalize(embeddings), F.normalize(weight)), labels).backward()
        if name == "sgd":
            expected = global_weight - 0.1 * (weight.grad + 1e-3 * global_weight
                                              + 0.9 * global_state["momentum_buffer"])
            assert torch.allclose(on_one[name]["after"], expected, rtol=1e-5, atol=1e-7)


def test_same_world_size_restores_weights_state_and_sampler(tmp_path: Path) -> None:
    def make() -> tuple[PartialFC, torch.optim.Optimizer]:
        pfc = PartialFC(ClassPartition(200, 1, 0), DIM, _NormFace(), sample_rate=0.2, seed=4)
        return pfc, pfc.build_optimizer("sgd", lr=0.1)

    def step(pfc: PartialFC, opt: torch.optim.Optimizer, seed: int) -> torch.Tensor:
        embeddings, labels = _batch(seed)
        opt.zero_grad()
        loss = pfc(embeddings, labels * 10)
        loss.backward()
        opt.step()
        return loss.detach()

    pfc, opt = make()
    step(pfc, opt, 0)
    path = save_fc_shard(tmp_path, pfc, opt)
    assert path.name == shard_filename(0, 1)
    expected = [step(pfc, opt, s) for s in (1, 2)]
    resumed, resumed_opt = make()
    resumed.generator.manual_seed(12345)  # must be overwritten by the saved sampler state
    info = load_fc_resharded(tmp_path, resumed, resumed_opt)
    assert info == {"saved_world_size": 1, "resharded": False}
    assert [step(resumed, resumed_opt, s) for s in (1, 2)] == expected
    assert torch.equal(resumed.weight, pfc.weight)


def test_incomplete_or_mismatched_checkpoints_fail_loudly(tmp_path: Path) -> None:
    pfc = PartialFC(ClassPartition(NUM_CLASSES, 1, 0), DIM, _NormFace())
    with pytest.raises(FCCheckpointError, match="no FC shard files"):
        load_fc_resharded(tmp_path, pfc)
    # A shard of a 2-rank save without its sibling.
    torch.save({"x": 1}, tmp_path / shard_filename(1, 2))
    with pytest.raises(FCCheckpointError, match=r"missing fc_shard_00000-of-00002\.pt"):
        load_fc_resharded(tmp_path, pfc)
    (tmp_path / shard_filename(1, 2)).unlink()

    save_fc_shard(tmp_path, pfc)
    other = PartialFC(ClassPartition(NUM_CLASSES + 1, 1, 0), DIM, _NormFace())
    with pytest.raises(FCCheckpointError, match="num_classes 13 differs"):
        load_fc_resharded(tmp_path, other)
    with pytest.raises(FCCheckpointError, match="no optimizer state"):
        load_fc_resharded(tmp_path, pfc, pfc.build_optimizer("sgd", lr=0.1))
    save_fc_shard(tmp_path, pfc, pfc.build_optimizer("adamw", lr=0.1))
    with pytest.raises(FCCheckpointError, match="optimizer type RowAdamW differs from RowSGD"):
        load_fc_resharded(tmp_path, pfc, pfc.build_optimizer("sgd", lr=0.1))

    (tmp_path / shard_filename(0, 1)).write_bytes(b"not a checkpoint")
    with pytest.raises(FCCheckpointError, match=r"fc_shard_00000-of-00001\.pt: cannot read FC shard"):
        load_fc_resharded(tmp_path, pfc)


def test_shard_files_refuse_arbitrary_pickles(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run code under an unrestricted torch.load
            return (print, ("pwned",))

    pfc = PartialFC(ClassPartition(NUM_CLASSES, 1, 0), DIM, _NormFace())
    torch.save({"format_version": 1, "payload": Evil()}, tmp_path / shard_filename(0, 1))
    with pytest.raises(FCCheckpointError, match="cannot read FC shard"):
        load_fc_resharded(tmp_path, pfc)


def test_head_buffers_are_saved_and_restored(tmp_path: Path) -> None:
    """Running values of the margin head (the same on every rank) travel in the shards: AdaFace's norm
    statistics after two steps come back in a fresh head."""
    from arcface.head.margins import build_margin

    pfc = PartialFC(ClassPartition(NUM_CLASSES, 1, 0), DIM, build_margin("adaface", scale=8.0), seed=1)
    for seed in (0, 1):
        embeddings, labels = _batch(seed)
        pfc(embeddings * 3.0, labels)
    saved = {name: buffer.clone() for name, buffer in pfc.margin.named_buffers()}
    assert saved["batch_mean"] != 20.0 and saved["batch_std"] != 100.0  # moved from their initial values
    save_fc_shard(tmp_path, pfc)
    fresh = PartialFC(ClassPartition(NUM_CLASSES, 1, 0), DIM, build_margin("adaface", scale=8.0), seed=2)
    load_fc_resharded(tmp_path, fresh)
    for name, buffer in fresh.margin.named_buffers():
        assert torch.equal(buffer, saved[name]), name
