"""Softmax + center loss with class-sharded centres (arcface.objectives.center_loss) against independent
references.

References: the center loss and the paper's centre rule written out per sample and per class in
float64 (Python loops, autograd only for the embedding gradient); the dense single-process softmax
(``F.cross_entropy`` on the full classifier: cosine margin logits, or
``arcface.objectives.losses.LSoftmax``); an uninterrupted training run for the resume checks.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arcface.head.lsoftmax import LSoftmaxHead
from arcface.head.margins import CombinedMargin
from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.head.shard_checkpoint import FCCheckpointError, list_fc_shards
from arcface.objectives.center_loss import CenterLossOptimizer, ShardedCenters, SoftmaxCenterObjective
from arcface.objectives.losses import LSoftmax
from tests.arcface.test_train_loop import backbone_state, global_fc, make_cfg, tiny_bn_factory
from tests.dist_utils import run_distributed

CLASSES, DIM, BATCH = 11, 5, 12  # 12 rows split evenly over 1, 2 and 3 ranks
WEIGHT, ALPHA = 0.1, 0.5
# (head, center term on normalised embeddings): the cosine margin head, and L-Softmax (m = 3, lambda 2)
CASES = (("cosine", False), ("lsoftmax", True))


def make_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """fp64 global batch, FC matrix and (non-zero) centre table; some classes repeat, some are absent."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 3, 3, 10, 5, 0, 7, 3, 10, 2, 5, 5])
    return {"embeddings": torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64) * 1.5,
            "labels": labels,
            "weight": torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64),
            "centers": torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64) * 0.5}


def dense_center(embeddings: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, normalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(center term, its gradient w.r.t. the embeddings, centres after the paper's update), by the book."""
    x = embeddings.detach().clone().requires_grad_()
    features = F.normalize(x, dim=1) if normalize else x
    terms = [0.5 * ((features[i] - centers[int(labels[i])]) ** 2).sum() for i in range(len(labels))]
    loss = sum(terms) / len(labels)
    loss.backward()
    updated = centers.clone()
    for j in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if int(labels[i]) == j]
        delta = sum(centers[j] - features[i].detach() for i in members) / (1 + len(members))
        updated[j] = centers[j] - ALPHA * delta
    return loss.detach(), x.grad, updated


def make_head(head: str) -> torch.nn.Module:
    if head == "lsoftmax":
        return LSoftmaxHead(3, lambda_base=2.0, lambda_gamma=0.0, lambda_power=1.0, lambda_min=0.0)
    return CombinedMargin(8.0, 1.0, 0.3, 0.0)


def dense_softmax(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, head: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax loss, its gradient w.r.t. the embeddings) of the whole classifier on one process."""
    x = embeddings.detach().clone().requires_grad_()
    if head == "lsoftmax":
        module = LSoftmax(DIM, CLASSES, margin=3, base_weight=2.0).double()
        with torch.no_grad():
            module.weight.copy_(weight)
        logits = module(x, labels)
    else:
        logits = CombinedMargin(8.0, 1.0, 0.3, 0.0)(F.linear(F.normalize(x), F.normalize(weight)), labels)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), x.grad


def build(rank: int, world_size: int, data: dict[str, torch.Tensor], head: str, normalize: bool
          ) -> SoftmaxCenterObjective:
    """This rank's fp64 objective holding its slice of the global FC matrix and centre table."""
    part = ClassPartition(CLASSES, world_size, rank)
    pfc = PartialFC(part, DIM, make_head(head)).double()
    centers = ShardedCenters(part, DIM, ALPHA, normalize=normalize, dtype=torch.float64)
    with torch.no_grad():
        pfc.weight.copy_(data["weight"][part.class_start:part.class_end])
        centers.centers.copy_(data["centers"][part.class_start:part.class_end])
    return SoftmaxCenterObjective(pfc, centers, WEIGHT)


def sharded_step(rank: int, world_size: int) -> dict[str, dict]:
    """Per case: this rank's loss, center term, local embedding gradient and updated centres."""
    data = make_data()
    per_rank = BATCH // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    out = {}
    for head, normalize in CASES:
        objective = build(rank, world_size, data, head, normalize)
        x = data["embeddings"][mine].clone().requires_grad_()
        loss = objective(x, data["labels"][mine])
        loss.backward()
        objective.centers.apply_update()
        out[f"{head}-{normalize}"] = {"loss": loss.detach(), "center": objective.log_values()["center"],
                                      "grad": x.grad, "centers": objective.centers.centers.clone()}
    return out


def train_and_save(rank: int, world_size: int, root: str, steps: int = 2) -> dict[str, torch.Tensor]:
    """fp32 objective (cosine head, sampled sparse FC, SGD momentum): ``steps`` updates, then save."""
    part = ClassPartition(CLASSES, world_size, rank)
    pfc = PartialFC(part, DIM, make_head("cosine"), sample_rate=0.6, seed=3)
    objective = SoftmaxCenterObjective(pfc, ShardedCenters(part, DIM, ALPHA), WEIGHT)
    optimizer = CenterLossOptimizer(pfc.build_optimizer("sgd", lr=0.2, momentum=0.9), objective.centers)
    data = make_data(1)
    per_rank = BATCH // world_size
    for step in range(steps):
        embeddings = data["embeddings"].float() + step
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        optimizer.zero_grad()
        objective(embeddings[mine], data["labels"][mine]).backward()
        optimizer.step()
    objective.save(Path(root), optimizer)
    return {"weight": pfc.weight.detach().clone(), "centers": objective.centers.centers.clone(),
            "momentum": optimizer.state[pfc.weight]["momentum_buffer"].clone()}


def load_saved(rank: int, world_size: int, root: str) -> dict[str, torch.Tensor | bool]:
    """Load a checkpoint saved on any world size into a fresh objective (other seed) on this one."""
    part = ClassPartition(CLASSES, world_size, rank)
    pfc = PartialFC(part, DIM, make_head("cosine"), sample_rate=0.6, seed=99)
    objective = SoftmaxCenterObjective(pfc, ShardedCenters(part, DIM, ALPHA), WEIGHT)
    optimizer = CenterLossOptimizer(pfc.build_optimizer("sgd", lr=0.5), objective.centers)
    resharded = objective.load(Path(root), optimizer)
    return {"weight": pfc.weight.detach().clone(), "centers": objective.centers.centers.clone(),
            "momentum": optimizer.state[pfc.weight]["momentum_buffer"].clone(), "resharded": resharded,
            "lr": optimizer.param_groups[0]["lr"]}


def _worker(rank: int, world_size: int, root: str) -> dict:
    out = {"step": sharded_step(rank, world_size)}
    if world_size == 2:
        out["saved"] = train_and_save(rank, world_size, root)
    else:
        out["loaded"] = load_saved(rank, world_size, root)
    return out


def check_against_dense(results: list[dict[str, dict]]) -> None:
    data = make_data()
    for head, normalize in CASES:
        key = f"{head}-{normalize}"
        center, center_grad, updated = dense_center(data["embeddings"], data["labels"], data["centers"],
                                                    normalize)
        softmax, softmax_grad = dense_softmax(data["embeddings"], data["labels"], data["weight"], head)
        for r in results:  # the same value on every rank
            torch.testing.assert_close(r[key]["loss"], softmax + WEIGHT * center, rtol=1e-9, atol=0)
            assert r[key]["center"] == pytest.approx(float(center), rel=1e-9)
        grad = torch.cat([r[key]["grad"] for r in results])
        torch.testing.assert_close(grad, softmax_grad + WEIGHT * center_grad, rtol=1e-9, atol=1e-12)
        centers = torch.cat([r[key]["centers"] for r in results])
        torch.testing.assert_close(centers, updated, rtol=1e-9, atol=1e-12)
        # absent classes did not move, present ones did
        present = torch.zeros(CLASSES, dtype=torch.bool)
        present[data["labels"]] = True
        assert torch.equal(centers[~present], data["centers"][~present])
        assert bool((centers[present] != data["centers"][present]).all(dim=1).all())


# ----------------------------------------------------------------------------------------------- W = 1

def test_one_process_equals_the_dense_reference() -> None:
    check_against_dense([sharded_step(0, 1)])


def test_centres_move_once_per_update_over_all_its_micro_batches_and_skipped_updates_leave_them() -> None:
    data = make_data(2)
    part = ClassPartition(CLASSES, 1, 0)
    centers = ShardedCenters(part, DIM, ALPHA, dtype=torch.float64)
    centers.centers.copy_(data["centers"])
    pfc = PartialFC(part, DIM, make_head("cosine")).double()
    objective = SoftmaxCenterObjective(pfc, centers, WEIGHT)
    optimizer = CenterLossOptimizer(pfc.build_optimizer("sgd", lr=0.1), centers)
    # two micro-batches of one update: the rule over their union, with the centres from before the update
    for half in (slice(0, 6), slice(6, 12)):
        objective(data["embeddings"][half], data["labels"][half]).backward()
    optimizer.step()
    _, _, expected = dense_center(data["embeddings"], data["labels"], data["centers"], False)
    torch.testing.assert_close(centers.centers, expected, rtol=1e-12, atol=1e-14)
    optimizer.zero_grad()
    # an update the trainer skips (no step): zero_grad forgets its samples, the next step moves nothing
    before = centers.centers.clone()
    objective(data["embeddings"], data["labels"])
    optimizer.zero_grad()
    optimizer.step()
    assert torch.equal(centers.centers, before)
    # the wrapper is the FC optimiser for the schedule: the same param groups
    optimizer.param_groups[0]["lr"] = 0.01
    assert optimizer.fc_optimizer.param_groups[0]["lr"] == 0.01


def test_config_builds_the_objective_and_refuses_bad_values() -> None:
    from arcface.config import load_config
    from arcface.objectives import build_objective

    cfg = load_config(None, ["loss.kind=softmax+center", "loss.head=lsoftmax", "loss.lsoftmax_margin=1",
                             "loss.center_weight=0.01", "loss.center_lr=0.25", "backbone.embedding_size=8"])
    objective = build_objective(cfg, 20, 0, 1, torch.device("cpu"))
    assert isinstance(objective, SoftmaxCenterObjective) and objective.center_weight == 0.01
    assert objective.centers.alpha == 0.25 and tuple(objective.centers.centers.shape) == (20, 8)
    assert isinstance(objective.pfc.margin, LSoftmaxHead) and objective.pfc.margin.margin == 1
    assert isinstance(objective.build_optimizer(cfg, 0.1), CenterLossOptimizer)
    assert "center loss" in objective.describe()
    defaults = load_config(None).loss
    assert (defaults.center_weight, defaults.center_lr, defaults.center_normalize) == (0.003, 0.5, False)
    with pytest.raises(ValueError, match=r"loss.center_lr must be in \(0, 1\]"):
        load_config(None, ["loss.center_lr=0"])
    with pytest.raises(ValueError, match="loss.center_weight must be a finite number >= 0"):
        load_config(None, ["loss.center_weight=-0.1"])


def test_a_checkpoint_without_centres_is_refused_naming_the_file(tmp_path: Path) -> None:
    from arcface.head.shard_checkpoint import save_fc_shard

    part = ClassPartition(CLASSES, 1, 0)
    save_fc_shard(tmp_path, PartialFC(part, DIM, make_head("cosine")))  # a margin-softmax shard
    objective = SoftmaxCenterObjective(PartialFC(part, DIM, make_head("cosine")),
                                       ShardedCenters(part, DIM, ALPHA), WEIGHT)
    with pytest.raises(FCCheckpointError, match=r"fc_shard_00000-of-00001\.pt: no 'centers' rows"):
        objective.load(tmp_path, None)


# ----------------------------------------------------------------------------------- W = 2, 3 on gloo

@pytest.mark.distributed
@pytest.mark.slow
def test_two_and_three_ranks_equal_the_dense_loss_and_reshard_exactly(tmp_path: Path) -> None:
    """Loss, embedding gradient and centre update on 2 and 3 ranks equal one dense process (fp64); a
    checkpoint saved on 2 ranks loads on 3 and on 1 with the same global FC, momentum and centres."""
    on_two = run_distributed(_worker, 2, (str(tmp_path),), timeout_s=240)
    check_against_dense([r["step"] for r in on_two])
    on_three = run_distributed(_worker, 3, (str(tmp_path),), timeout_s=240)
    check_against_dense([r["step"] for r in on_three])

    saved = {key: torch.cat([r["saved"][key] for r in on_two]) for key in ("weight", "centers", "momentum")}
    assert bool((saved["centers"] != 0).any()) and bool((saved["momentum"] != 0).any())
    assert [p.name for p in list_fc_shards(tmp_path)] == ["fc_shard_00000-of-00002.pt",
                                                          "fc_shard_00001-of-00002.pt"]
    on_one = [load_saved(0, 1, str(tmp_path))]
    for layout in ([r["loaded"] for r in on_three], on_one):
        for key in ("weight", "centers", "momentum"):
            assert torch.equal(torch.cat([r[key] for r in layout]), saved[key]), key
        assert all(r["resharded"] and r["lr"] == 0.2 for r in layout)


# ------------------------------------------------------------------------------- through arcface.train

def _centres(checkpoint: Path) -> torch.Tensor:
    return torch.cat([torch.load(p, weights_only=True)["extra_rows"]["centers"]
                      for p in list_fc_shards(checkpoint)])


def test_training_end_to_end_checkpoints_the_centres_and_resumes_exactly(tmp_path: Path) -> None:
    """The paper's setting (plain softmax W x = L-Softmax m = 1, raw features, alpha 0.5) through the
    trainer: finite losses, the centres in the checkpoint, and a stop/resume equal to the uninterrupted
    run (losses, backbone, FC and centres bit for bit)."""
    from arcface.train import train

    extra = ("loss.kind=softmax+center", "loss.head=lsoftmax", "loss.lsoftmax_margin=1",
             "loss.center_weight=0.05", "optim.lr=0.05", "runtime.log_every=3")
    full = train(make_cfg(tmp_path / "full", 6, *extra), backbone_factory=tiny_bn_factory)
    assert all(math.isfinite(v) for v in full["losses"]) and len(full["losses"]) == 6
    final = Path(full["checkpoint"])
    centres = _centres(final)
    assert tuple(centres.shape) == (13, 16) and bool((centres.abs().sum(dim=1) > 0).any())
    log = (tmp_path / "full" / "train.log").read_text()
    assert "center loss" in log and " | center " in log and " | softmax " in log

    out = tmp_path / "cut"
    first = train(make_cfg(out, 6, *extra), max_steps=3, backbone_factory=tiny_bn_factory)
    second = train(make_cfg(out, 6, *extra), backbone_factory=tiny_bn_factory)
    assert second["resumed_from"] == first["checkpoint"]
    assert first["losses"] + second["losses"] == full["losses"]
    resumed = Path(second["checkpoint"])
    assert torch.equal(_centres(resumed), centres)
    assert torch.equal(global_fc(resumed), global_fc(final))
    a, b = backbone_state(final), backbone_state(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)
    # the centres of the step-3 checkpoint differ from the final ones: they are trained, not constant
    assert not torch.equal(_centres(Path(first["checkpoint"])), centres)
    shutil.rmtree(out)
