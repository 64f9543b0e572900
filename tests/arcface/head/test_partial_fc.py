"""Sharded Partial FC against independent references.

References: the dense single-process computation ``F.cross_entropy(margin(normalize(E) @ normalize(W).T))``
with autograd on the full weight matrix; DTensor's class-sharded cross-entropy (``loss_parallel``) as a
second reference for the distributed softmax; plain ``torch.optim.SGD`` + a dense linear backbone for the
DDP gradient-scaling contract.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arcface.distributed import scale_gradient
from arcface.head.margins import CombinedMargin
from arcface.head.partial_fc import PartialFC, distributed_cross_entropy, init_fc_weight
from arcface.head.partition import ClassPartition
from tests.dist_utils import run_distributed

# (scale, m1 SphereFace multiplicative, m2 ArcFace additive angular, m3 CosFace additive cosine)
MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.35),
           "combined": (64.0, 1.0, 0.3, 0.2)}


# Margins whose batch statistics the sharded classifier must supply (arcface.head.margins hooks).
STATEFUL_MARGINS = ("adaface", "curricularface")


def make_margin(kind: str) -> nn.Module:
    if kind in STATEFUL_MARGINS:
        from arcface.head.margins import build_margin

        return build_margin(kind)
    scale, m1, m2, m3 = MARGINS[kind]
    return CombinedMargin(scale, m1, m2, m3)


def dense_reference(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    margin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-process loss and gradients w.r.t. embeddings and the full weight matrix."""
    embeddings = embeddings.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    cos_theta = F.linear(F.normalize(embeddings), F.normalize(weight))
    extra = {"embedding_norms": embeddings.detach().norm(dim=1)} if getattr(margin, "needs_embedding_norms",
                                                                             False) else {}
    loss = F.cross_entropy(margin(cos_theta, labels, **extra), labels)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def make_batch(num_classes: int, global_batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(global_batch, dim, generator=generator)
    labels = torch.randint(0, num_classes, (global_batch,), generator=generator)
    labels[0] = num_classes - 1  # a target on the last (smallest) shard
    return embeddings, labels


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return torch.allclose(a.to_dense() if a.is_sparse else a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------- W = 1

@pytest.mark.parametrize("kind", sorted(MARGINS))
def test_single_process_equals_dense(kind: str) -> None:
    embeddings, labels = make_batch(37, 12, 16, seed=1)
    pfc = PartialFC(ClassPartition(37, 1, 0), 16, make_margin(kind), seed=5)
    local = embeddings.clone().requires_grad_()
    loss = pfc(local, labels)
    loss.backward()
    ref_loss, ref_egrad, ref_wgrad = dense_reference(embeddings, labels, pfc.weight, make_margin(kind))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert close(local.grad, ref_egrad) and close(pfc.weight.grad, ref_wgrad)


def test_reduced_precision_embeddings_run_in_fp32() -> None:
    embeddings, labels = make_batch(23, 6, 8, seed=2)
    pfc = PartialFC(ClassPartition(23, 1, 0), 8, make_margin("arcface"), seed=1)
    low = embeddings.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(low, labels)
    loss.backward()
    # The bf16 values are exactly representable in fp32: the fp32 dense computation on them is the reference.
    ref_loss, ref_egrad, _ = dense_reference(low.detach().float(), labels, pfc.weight, make_margin("arcface"))
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref_loss, rtol=1e-6)
    assert low.grad.dtype == torch.bfloat16
    assert torch.allclose(low.grad.float(), ref_egrad, rtol=1e-2, atol=1e-4)


def test_distributed_cross_entropy_reports_exact_large_losses() -> None:
    logits = torch.tensor([[0.0, 1000.0, -5.0], [3.0, -2.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0, 2])
    loss = distributed_cross_entropy(logits, targets, distributed=False)
    ref = F.cross_entropy(logits, targets)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-6) and loss.item() > 499  # not clamped
    loss.backward()
    ref_grad = torch.autograd.grad(F.cross_entropy(logits, targets), logits)[0]
    assert torch.allclose(logits.grad, ref_grad, atol=1e-7)


def test_fc_init_does_not_depend_on_world_size() -> None:
    full = init_fc_weight(ClassPartition(70_000, 1, 0), 4, seed=9)
    shards = [init_fc_weight(p, 4, seed=9) for p in ClassPartition(70_000, 3, 0).all_ranks()]
    assert torch.equal(torch.cat(shards), full)
    assert abs(full.std().item() - 0.01) < 1e-3


# ------------------------------------------------------------------------------------------ sampling

def test_sampling_keeps_positives_and_matches_dense_on_sampled_columns() -> None:
    num_classes, dim = 1000, 16
    embeddings, labels = make_batch(num_classes, 40, dim, seed=3)
    pfc = PartialFC(ClassPartition(num_classes, 1, 0), dim, make_margin("arcface"), sample_rate=0.1, seed=4)
    local = embeddings.clone().requires_grad_()
    loss = pfc(local, labels)
    loss.backward()
    sampled = pfc.sampled_classes()
    assert sampled.numel() == 100 and torch.equal(sampled, sampled.unique())  # sorted, no duplicates
    assert set(labels.tolist()) <= set(sampled.tolist())
    # Reference: the dense loss over exactly the sampled columns, labels remapped to them.
    remapped = torch.searchsorted(sampled, labels)
    ref_loss, ref_egrad, ref_wgrad = dense_reference(embeddings, remapped, pfc.weight.detach()[sampled],
                                                     make_margin("arcface"))
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert close(local.grad, ref_egrad)
    grad = pfc.weight.grad
    assert grad.is_sparse  # sparse update: no dense gradient of the shard
    grad = grad.coalesce()
    assert torch.equal(grad.indices()[0], sampled)
    assert torch.allclose(grad.values(), ref_wgrad, rtol=1e-4, atol=1e-7)


def test_sampling_is_seeded_and_fresh_every_step() -> None:
    embeddings, labels = make_batch(500, 8, 8, seed=5)

    def sampled_rows(seed: int, steps: int) -> list[torch.Tensor]:
        pfc = PartialFC(ClassPartition(500, 1, 0), 8, make_margin("cosface"), sample_rate=0.2, seed=seed)
        out = []
        for _ in range(steps):
            pfc(embeddings, labels)
            out.append(pfc.sampled_rows.clone())
        return out

    first, again, other = sampled_rows(1, 3), sampled_rows(1, 3), sampled_rows(2, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # negatives resampled each step
    assert not torch.equal(first[0], other[0])
    # Negatives are uniform: over many steps every non-positive class gets drawn at a similar rate.
    pfc = PartialFC(ClassPartition(500, 1, 0), 8, make_margin("cosface"), sample_rate=0.2, seed=3)
    counts = torch.zeros(500)
    for _ in range(200):
        counts[pfc.sample(torch.tensor([0, 1]))[0]] += 1
    assert counts[0] == counts[1] == 200
    negative_rate = counts[2:] / 200  # expected (100 - 2) / 498 each
    assert abs(negative_rate.mean().item() - 98 / 498) < 1e-6 and negative_rate.std().item() < 0.05


def test_positives_beyond_sample_budget_are_all_kept() -> None:
    labels = torch.arange(0, 60, 2)  # 30 positives, budget floor(0.1 * 100) = 10
    pfc = PartialFC(ClassPartition(100, 1, 0), 8, make_margin("arcface"), sample_rate=0.1)
    pfc(torch.randn(30, 8), labels)
    assert torch.equal(pfc.sampled_classes(), labels)


def test_dense_update_gives_the_densified_sparse_gradient() -> None:
    embeddings, labels = make_batch(300, 16, 8, seed=6)
    grads = {}
    for update in ("sparse", "dense"):
        pfc = PartialFC(ClassPartition(300, 1, 0), 8, make_margin("combined"), sample_rate=0.3, update=update,
                        seed=2)
        pfc(embeddings, labels).backward()
        grads[update] = pfc.weight.grad
    assert grads["sparse"].is_sparse and not grads["dense"].is_sparse
    assert torch.allclose(grads["sparse"].to_dense(), grads["dense"], atol=1e-8)


def test_bad_inputs_raise_clear_errors() -> None:
    part = ClassPartition(10, 1, 0)
    with pytest.raises(ValueError, match="fc.sample_rate"):
        PartialFC(part, 4, make_margin("arcface"), sample_rate=0.0)
    with pytest.raises(ValueError, match="fc.update"):
        PartialFC(part, 4, make_margin("arcface"), update="lazy")
    with pytest.raises(ValueError, match="world size"):
        PartialFC(ClassPartition(10, 2, 0), 4, make_margin("arcface"))
    pfc = PartialFC(part, 4, make_margin("arcface"))
    with pytest.raises(ValueError, match=r"embeddings \[batch, 4\]"):
        pfc(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        pfc(torch.randn(2, 4), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="fc.optimizer"):
        pfc.build_optimizer("lamb")


# ----------------------------------------------------------------------------- W = 2, 3 on gloo

def _sharded_worker(rank: int, world_size: int, embeddings: torch.Tensor, labels: torch.Tensor,
                    num_classes: int) -> dict:
    """Everything one rank computes for the W = 2 / 3 comparisons (batched: process spawn is slow)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    part = ClassPartition(num_classes, world_size, rank)
    batch = embeddings.shape[0] // world_size
    mine = slice(rank * batch, (rank + 1) * batch)
    out: dict = {}
    for kind in sorted(MARGINS) + list(STATEFUL_MARGINS):
        pfc = PartialFC(part, embeddings.shape[1], make_margin(kind), seed=11)
        local = embeddings[mine].clone().requires_grad_()
        loss = pfc(local, labels[mine])
        loss.backward()
        out[kind] = {"loss": loss.detach(), "egrad": local.grad, "wgrad": pfc.weight.grad,
                     "weight": pfc.weight.detach().clone()}

    # Sampled + sparse: the global set of sampled classes comes back for the restricted reference.
    pfc = PartialFC(part, embeddings.shape[1], make_margin("arcface"), sample_rate=0.5, seed=11)
    local = embeddings[mine].clone().requires_grad_()
    loss = pfc(local, labels[mine])
    loss.backward()
    grad = pfc.weight.grad.coalesce()
    out["sampled"] = {"loss": loss.detach(), "egrad": local.grad, "classes": pfc.sampled_classes(),
                      "grad_rows": grad.indices()[0] + part.class_start, "grad_values": grad.values()}

    # Second reference for the distributed softmax: DTensor's class-sharded cross-entropy on the same
    # local logits. DTensor shards like torch.chunk, so pad every shard to ceil(C / W) columns.
    pfc = PartialFC(part, embeddings.shape[1], make_margin("cosface"), seed=11)
    local_targets = part.to_local(labels)
    with torch.no_grad():
        cos_theta = F.linear(F.normalize(embeddings), F.normalize(pfc.weight))
        local_logits = pfc.margin(cos_theta, local_targets)
    ours_in = local_logits.clone().requires_grad_()
    ours = distributed_cross_entropy(ours_in, local_targets)
    ours.backward()
    padded_width = -(-num_classes // world_size)
    dt_in = local_logits.clone().requires_grad_()
    padded = torch.cat([dt_in, dt_in.new_full((dt_in.shape[0], padded_width - part.num_local), -1e4)], dim=1)
    owner = part.owner_of(labels)
    starts = torch.tensor([p.class_start for p in part.all_ranks()])
    padded_labels = owner * padded_width + (labels - starts[owner])
    mesh = init_device_mesh("cpu", (world_size,))
    with loss_parallel():
        dt_loss = F.cross_entropy(DTensor.from_local(padded, mesh, [Shard(1)]), padded_labels)
        dt_loss.backward()
    out["dtensor"] = {"ours": ours.detach(), "ours_grad": ours_in.grad, "dt": dt_loss.full_tensor().detach(),
                      "dt_grad": dt_in.grad}
    return out


def _ddp_worker(rank: int, world_size: int, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                steps: int) -> dict:
    """A linear 'backbone' under DDP + PartialFC with scale_gradient: a few SGD steps."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    backbone = nn.Linear(inputs.shape[1], 8)
    ddp = DistributedDataParallel(backbone)
    pfc = PartialFC(ClassPartition(num_classes, world_size, rank), 8, make_margin("arcface"), seed=7)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fc_opt = pfc.build_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    batch = inputs.shape[0] // world_size
    mine = slice(rank * batch, (rank + 1) * batch)
    losses, first_grad = [], None
    for _ in range(steps):
        opt.zero_grad()
        fc_opt.zero_grad()
        embeddings = scale_gradient(ddp(inputs[mine]), world_size)
        loss = pfc(embeddings, labels[mine])
        loss.backward()
        if first_grad is None:
            first_grad = backbone.weight.grad.clone()
        opt.step()
        fc_opt.step()
        losses.append(loss.item())
    return {"losses": losses, "first_grad": first_grad, "backbone": backbone.weight.detach().clone(),
            "fc": pfc.weight.detach().clone()}


def _dense_training(inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int) -> dict:
    """Single process, full batch, dense FC matrix, plain torch.optim.SGD: the reference run."""
    torch.manual_seed(0)
    backbone = nn.Linear(inputs.shape[1], 8)
    weight = nn.Parameter(init_fc_weight(ClassPartition(num_classes, 1, 0), 8, seed=7))
    margin = make_margin("arcface")
    opt = torch.optim.SGD([*backbone.parameters(), weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    losses, first_grad = [], None
    for _ in range(steps):
        opt.zero_grad()
        cos_theta = F.linear(F.normalize(backbone(inputs)), F.normalize(weight))
        loss = F.cross_entropy(margin(cos_theta, labels), labels)
        loss.backward()
        if first_grad is None:
            first_grad = backbone.weight.grad.clone()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "first_grad": first_grad, "backbone": backbone.weight.detach(),
            "fc": weight.detach()}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size,num_classes", [(2, 11), (3, 11)])
def test_sharded_fc_equals_dense_single_process(world_size: int, num_classes: int) -> None:
    embeddings, labels = make_batch(num_classes, 4 * world_size, 16, seed=7)
    results = run_distributed(_sharded_worker, world_size, (embeddings, labels, num_classes), timeout_s=180)
    parts = ClassPartition(num_classes, world_size, 0).all_ranks()
    assert [r["arcface"]["weight"].shape[0] for r in results] == [p.num_local for p in parts]
    for kind in sorted(MARGINS) + list(STATEFUL_MARGINS):
        full_weight = torch.cat([r[kind]["weight"] for r in results])
        ref_loss, ref_egrad, ref_wgrad = dense_reference(embeddings, labels, full_weight, make_margin(kind))
        for rank, (res, part) in enumerate(zip(results, parts)):
            assert torch.allclose(res[kind]["loss"], ref_loss, rtol=1e-5), (kind, rank)
            batch = embeddings.shape[0] // world_size
            assert close(res[kind]["egrad"], ref_egrad[rank * batch:(rank + 1) * batch]), (kind, rank)
            assert close(res[kind]["wgrad"], ref_wgrad[part.class_start:part.class_end]), (kind, rank)

    # Sampled: every positive present; the loss is the dense loss over the union of sampled columns.
    classes = torch.cat([r["sampled"]["classes"] for r in results])
    assert set(labels.tolist()) <= set(classes.tolist())
    full_weight = torch.cat([r["arcface"]["weight"] for r in results])
    ref_loss, ref_egrad, ref_wgrad = dense_reference(embeddings, torch.searchsorted(classes, labels),
                                                     full_weight[classes], make_margin("arcface"))
    assert torch.equal(torch.cat([r["sampled"]["grad_rows"] for r in results]), classes)
    assert close(torch.cat([r["sampled"]["grad_values"] for r in results]), ref_wgrad)
    assert close(torch.cat([r["sampled"]["egrad"] for r in results]), ref_egrad)
    for res in results:
        assert torch.allclose(res["sampled"]["loss"], ref_loss, rtol=1e-5)

    # DTensor loss_parallel agrees with our distributed cross-entropy: loss and logits gradient.
    for res in results:
        assert torch.allclose(res["dtensor"]["ours"], res["dtensor"]["dt"], rtol=1e-5)
        assert close(res["dtensor"]["ours_grad"], res["dtensor"]["dt_grad"], atol=1e-7)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_backbone_with_scale_gradient_trains_like_one_process() -> None:
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(8, 6, generator=generator)
    labels = torch.randint(0, 9, (8,), generator=generator)
    results = run_distributed(_ddp_worker, 2, (inputs, labels, 9, 3), timeout_s=180)
    ref = _dense_training(inputs, labels, 9, 3)
    for res in results:
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert close(res["first_grad"], ref["first_grad"])  # gradient of the dense global-batch loss
        assert close(res["backbone"], ref["backbone"])
    assert close(torch.cat([r["fc"] for r in results]), ref["fc"])
