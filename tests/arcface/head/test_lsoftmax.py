"""L-Softmax head (arcface.head.lsoftmax) against independent float64 references.

References: ``arcface.objectives.losses.LSoftmax`` (autograd through ``acos`` and the piecewise ``psi`` of the
paper: a separate implementation, no Chebyshev polynomials, no hand-written gradient), the paper's formula
evaluated row by row, and ``torch.autograd.gradcheck`` (finite differences). The sharded classifier
with this head on 2 and 3 ranks is checked in tests/arcface/objectives/test_center_loss.py (with and
without the center term).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arcface.config import load_config
from arcface.head.lsoftmax import LSoftmaxHead, chebyshev_psi, lsoftmax_lambda, lsoftmax_logits
from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.head.shard_checkpoint import load_fc_resharded, save_fc_shard
from arcface.objectives.losses import LSoftmax, lsoftmax_psi

DIM, CLASSES = 6, 9


def spread_batch(seed: int, margin: int, fractions: tuple[float, ...] = (0.5, 0.03, 0.97)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 weight [CLASSES, DIM], embeddings and labels whose target angles cover every piece
    [k pi/m, (k+1) pi/m] of psi (by default the middle of each piece and near its ends), with varied
    norms."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64) * 0.7
    angles = []
    for k in range(margin):
        lo, hi = k * math.pi / margin, (k + 1) * math.pi / margin
        angles += [lo + (hi - lo) * f for f in fractions]
    labels = torch.randint(0, CLASSES, (len(angles),), generator=generator)
    rows = []
    for theta, label in zip(angles, labels.tolist()):
        unit_w = weight[label] / weight[label].norm()
        other = torch.randn(DIM, generator=generator, dtype=torch.float64)
        other = other - (other @ unit_w) * unit_w
        other = other / other.norm()
        norm = 0.5 + 3.0 * torch.rand((), generator=generator, dtype=torch.float64)
        rows.append(norm * (math.cos(theta) * unit_w + math.sin(theta) * other))
    return weight, torch.stack(rows), labels


def reference(weight: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, margin: int,
              lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, loss, d loss / d embeddings, d loss / d weight) of
    arcface.objectives.losses.LSoftmax + cross-entropy."""
    module = LSoftmax(DIM, weight.shape[0], margin=margin, base_weight=lam).double()
    with torch.no_grad():
        module.weight.copy_(weight)
    x = embeddings.clone().requires_grad_()
    logits = module(x, labels)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return logits.detach(), loss.detach(), x.grad, module.weight.grad


def test_psi_by_chebyshev_polynomials_is_the_papers_piecewise_function() -> None:
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    for margin in (1, 2, 3, 4, 5):
        psi, dpsi = chebyshev_psi(torch.cos(theta), margin)
        torch.testing.assert_close(psi, lsoftmax_psi(theta, margin), rtol=0, atol=1e-12)
        # d psi / d cos = (d psi / d theta) / (d cos / d theta), away from theta = 0, pi where sin = 0
        inner = theta[10:-10].clone().requires_grad_()
        lsoftmax_psi(inner, margin).sum().backward()
        torch.testing.assert_close(dpsi[10:-10], inner.grad / -torch.sin(inner.detach()), rtol=1e-9,
                                   atol=1e-9)
    # margin 1 is the plain softmax: psi = cos, slope 1
    cos = torch.linspace(-1, 1, 11, dtype=torch.float64)
    psi, dpsi = chebyshev_psi(cos, 1)
    assert torch.equal(psi, cos) and torch.equal(dpsi, torch.ones_like(cos))


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 2.5])
def test_logits_and_gradients_equal_the_independent_reference(margin: int, lam: float) -> None:
    weight, embeddings, labels = spread_batch(margin * 10 + int(lam), margin)
    ref_logits, ref_loss, ref_egrad, ref_wgrad = reference(weight, embeddings, labels, margin, lam)
    x = embeddings.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logits = lsoftmax_logits(x, w, None, labels, margin, lam)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, ref_egrad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_wgrad, rtol=1e-9, atol=1e-12)
    # The closed form row by row: non-targets W_j x, target (lam W_y x + |W_y||x| psi(theta)) / (1 + lam).
    for i, y in enumerate(labels.tolist()):
        plain = weight @ embeddings[i]
        cos = plain[y] / (weight[y].norm() * embeddings[i].norm())
        k = min(int(math.floor(math.acos(float(cos)) * margin / math.pi)), margin - 1)
        psi = (-1) ** k * math.cos(margin * math.acos(float(cos))) - 2 * k
        expected = plain.clone()
        expected[y] = (lam * plain[y] + weight[y].norm() * embeddings[i].norm() * psi) / (1 + lam)
        torch.testing.assert_close(logits[i].detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("margin", [2, 4])
def test_gradcheck(margin: int) -> None:
    weight, embeddings, labels = spread_batch(3, margin, fractions=(0.5, 0.1))
    targets = labels.clone()
    targets[0] = -1  # a row whose target is on another shard: plain W x everywhere
    assert torch.autograd.gradcheck(lambda x, w: lsoftmax_logits(x, w, None, targets, margin, 1.5),
                                    (embeddings.requires_grad_(), weight.requires_grad_()))


def test_sampled_rows_sparse_and_dense_layouts_equal_the_reference_on_those_rows() -> None:
    weight, embeddings, labels = spread_batch(5, 3)
    rows = torch.unique(torch.cat([labels, torch.tensor([0, 4])]))
    targets = torch.searchsorted(rows, labels)
    ref_logits, _, ref_egrad, ref_wgrad = reference(weight[rows], embeddings, targets, 3, 0.0)
    grads = {}
    for layout in ("sparse", "dense"):
        w = weight.clone().requires_grad_()
        x = embeddings.clone().requires_grad_()
        logits = lsoftmax_logits(x, w, rows, targets, 3, 0.0, grad_layout=layout)
        F.cross_entropy(logits, targets).backward()
        torch.testing.assert_close(logits.detach(), ref_logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad, ref_egrad, rtol=1e-9, atol=1e-12)
        grads[layout] = w.grad
    assert grads["sparse"].is_sparse and not grads["dense"].is_sparse
    dense = grads["dense"]
    torch.testing.assert_close(grads["sparse"].to_dense(), dense, rtol=0, atol=0)
    torch.testing.assert_close(dense[rows], ref_wgrad, rtol=1e-9, atol=1e-12)
    untouched = torch.ones(CLASSES, dtype=torch.bool)
    untouched[rows] = False
    assert bool((dense[untouched] == 0).all())


def test_partial_fc_with_the_head_equals_the_dense_loss_and_sampling_keeps_targets() -> None:
    """One process: the sharded classifier (fp64) with the L-Softmax head, unsampled and sampled."""
    weight, embeddings, labels = spread_batch(7, 4)
    head = LSoftmaxHead(4, lambda_base=10.0, lambda_gamma=1.0, lambda_power=1.0, lambda_min=0.0)
    pfc = PartialFC(ClassPartition(CLASSES, 1, 0), DIM, head, sample_rate=1.0).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = embeddings.clone().requires_grad_()
    loss = pfc(x, labels)
    loss.backward()
    _, ref_loss, ref_egrad, ref_wgrad = reference(weight, embeddings, labels, 4, 10.0)  # lambda at t = 0
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, ref_egrad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pfc.weight.grad, ref_wgrad, rtol=1e-9, atol=1e-12)
    assert int(head.iteration) == 1 and head.current_lambda() == pytest.approx(5.0)  # 10 / (1 + 1)

    # Sampled: 3 rows, so at most 3 positives among the 6 sampled classes; the rest are negatives.
    sampled = PartialFC(ClassPartition(CLASSES, 1, 0), DIM, LSoftmaxHead(2, lambda_min=0.0, lambda_base=0.0),
                        sample_rate=0.67, seed=3).double()
    with torch.no_grad():
        sampled.weight.copy_(weight)
    embeddings, labels = embeddings[:3], labels[:3]
    x = embeddings.clone().requires_grad_()
    loss = sampled(x, labels)
    loss.backward()
    rows = sampled.sampled_classes()
    assert rows.numel() == 6 and set(labels.tolist()) < set(rows.tolist())  # targets always sampled
    _, ref_loss, ref_egrad, _ = reference(weight[rows], embeddings, torch.searchsorted(rows, labels), 2, 0.0)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, ref_egrad, rtol=1e-9, atol=1e-12)


def test_lambda_anneals_per_training_forward_and_its_iteration_is_checkpointed(tmp_path: Path) -> None:
    assert lsoftmax_lambda(0, 1000.0, 0.12, 1.0, 5.0) == 1000.0
    assert lsoftmax_lambda(100, 1000.0, 0.12, 1.0, 5.0) == pytest.approx(1000.0 / 13.0)
    assert lsoftmax_lambda(10**6, 1000.0, 0.12, 1.0, 5.0) == 5.0
    head = LSoftmaxHead(4)
    pfc = PartialFC(ClassPartition(CLASSES, 1, 0), DIM, head)
    embeddings, labels = torch.randn(5, DIM), torch.randint(0, CLASSES, (5,))
    for _ in range(3):
        pfc(embeddings, labels)
    head.eval()
    pfc(embeddings, labels)  # evaluation forwards do not anneal
    assert int(head.iteration) == 3
    save_fc_shard(tmp_path, pfc)
    restored = PartialFC(ClassPartition(CLASSES, 1, 0), DIM, LSoftmaxHead(4))
    load_fc_resharded(tmp_path, restored)
    assert int(restored.margin.iteration) == 3
    assert restored.margin.current_lambda() == head.current_lambda() == pytest.approx(1000.0 / 1.36)


def test_config_builds_the_head_and_refuses_what_does_not_apply() -> None:
    from arcface.objectives import build_objective

    cfg = load_config(None, ["loss.head=lsoftmax", "loss.lsoftmax_margin=3", "loss.lsoftmax_lambda_min=0",
                             "backbone.embedding_size=8"])
    objective = build_objective(cfg, 20, 0, 1, torch.device("cpu"))
    head = objective.pfc.margin
    assert isinstance(head, LSoftmaxHead) and head.margin == 3 and head.lambda_min == 0.0
    assert head.lambda_base == 1000.0 and head.lambda_gamma == 0.12 and head.lambda_power == 1.0
    assert "LSoftmaxHead" in objective.describe()
    with pytest.raises(ValueError, match="loss.interclass_filtering_threshold must be 0 with loss.head"):
        load_config(None, ["loss.head=lsoftmax", "loss.interclass_filtering_threshold=0.3"])
    with pytest.raises(ValueError, match="loss.lsoftmax_margin must be an integer >= 1"):
        load_config(None, ["loss.head=lsoftmax", "loss.lsoftmax_margin=0"])
    with pytest.raises(ValueError, match="loss.lsoftmax_margin must be an integer"):
        load_config(None, ["loss.lsoftmax_margin=2.5"])
    with pytest.raises(ValueError, match="loss.lsoftmax_lambda_gamma must be a finite number >= 0"):
        load_config(None, ["loss.lsoftmax_lambda_gamma=-1"])
    with pytest.raises(ValueError, match="loss.head must be one of 'cosine', 'lsoftmax'"):
        load_config(None, ["loss.head=linear"])
