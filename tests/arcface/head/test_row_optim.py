"""Row optimisers: dense gradients == torch.optim.SGD / AdamW; sparse gradients == a hand-written
per-row step on the touched rows only, everything else (weights and state) bit-for-bit unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from arcface.head.partial_fc import PartialFC
from arcface.head.partition import ClassPartition
from arcface.head.row_optim import RowAdamW, RowSGD, build_fc_optimizer

ROWS, DIM = 12, 5
# Sorted rows (PartialFC's case), unsorted rows and repeated rows (summed by coalescing).
ROW_SETS = [torch.tensor([0, 3, 7]), torch.tensor([3, 4, 11]), torch.tensor([7, 3]), torch.tensor([5, 9, 5])]


def sparse_grad(rows: torch.Tensor, seed: int) -> torch.Tensor:
    values = torch.randn(rows.numel(), DIM, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, (ROWS, DIM), check_invariants=True)


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: RowSGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4),
     lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (lambda p: RowSGD([p], lr=0.05, momentum=0.0, weight_decay=0.0),
     lambda p: torch.optim.SGD([p], lr=0.05)),
    (lambda p: RowAdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05),
     lambda p: torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)),
])
def test_dense_gradients_match_torch_optimizers(ours, theirs) -> None:
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_a, opt_b = ours(a), theirs(b)
    for step in range(4):
        grad = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(step + 10))
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), step


@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.0, 5e-4), (0.0, 0.0), (0.9, 0.0)])
def test_sparse_sgd_equals_hand_written_row_step(momentum: float, wd: float) -> None:
    lr = 0.1
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(start.clone())
    opt = RowSGD([param], lr=lr, momentum=momentum, weight_decay=wd)
    ref_w = [row.clone() for row in start]
    ref_buf = [torch.zeros(DIM) for _ in range(ROWS)]
    for step, rows in enumerate(ROW_SETS):
        param.grad = sparse_grad(rows, step)
        values = param.grad.coalesce()
        for r, g in zip(values.indices()[0].tolist(), values.values()):
            d_p = g + wd * ref_w[r]
            ref_buf[r] = momentum * ref_buf[r] + d_p
            ref_w[r] = ref_w[r] - lr * ref_buf[r]
        opt.step()
        assert torch.allclose(param.detach(), torch.stack(ref_w), rtol=1e-6, atol=1e-7)
        if momentum:
            assert torch.allclose(opt.state[param]["momentum_buffer"], torch.stack(ref_buf), atol=1e-7)
    untouched = sorted(set(range(ROWS)) - {r for rows in ROW_SETS for r in rows.tolist()})
    assert torch.equal(param.detach()[untouched], start[untouched])  # no weight decay on untouched rows
    if momentum:
        assert bool((opt.state[param]["momentum_buffer"][untouched] == 0).all())


def test_sparse_adamw_equals_hand_written_row_step_with_per_row_counts() -> None:
    lr, (beta1, beta2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(2))
    param = torch.nn.Parameter(start.clone())
    opt = RowAdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    ref_w = [row.clone().double() for row in start]
    ref_m = [torch.zeros(DIM, dtype=torch.float64) for _ in range(ROWS)]
    ref_v = [torch.zeros(DIM, dtype=torch.float64) for _ in range(ROWS)]
    ref_t = [0] * ROWS
    for step, rows in enumerate(ROW_SETS):
        param.grad = sparse_grad(rows, step + 100)
        values = param.grad.coalesce()
        for r, g in zip(values.indices()[0].tolist(), values.values().double()):
            ref_t[r] += 1
            ref_w[r] = ref_w[r] * (1 - lr * wd)
            ref_m[r] = beta1 * ref_m[r] + (1 - beta1) * g
            ref_v[r] = beta2 * ref_v[r] + (1 - beta2) * g * g
            m_hat = ref_m[r] / (1 - beta1 ** ref_t[r])
            v_hat = ref_v[r] / (1 - beta2 ** ref_t[r])
            ref_w[r] = ref_w[r] - lr * m_hat / (v_hat.sqrt() + eps)
        opt.step()
        assert torch.allclose(param.detach().double(), torch.stack(ref_w), rtol=1e-5, atol=1e-6), step
    assert opt.state[param]["step"].tolist() == [float(t) for t in ref_t]
    assert ref_t[3] == 3 and ref_t[0] == 1  # row 3 in every step, row 0 once: counts are per row
    untouched = [r for r in range(ROWS) if ref_t[r] == 0]
    assert torch.equal(param.detach()[untouched], start[untouched])


class _NormFace(torch.nn.Module):
    """Scaled cosine logits, no margin: enough to drive a gradient through PartialFC."""

    def forward(self, cos_theta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 30.0 * cos_theta


def test_partial_fc_sparse_step_changes_only_sampled_rows() -> None:
    pfc = PartialFC(ClassPartition(400, 1, 0), 8, _NormFace(), sample_rate=0.1, seed=3)
    before = pfc.weight.detach().clone()
    opt = pfc.build_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=1e-3)
    labels = torch.tensor([5, 17, 399, 5])
    pfc(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), labels).backward()
    grad = pfc.weight.grad.coalesce()
    opt.step()
    rows = pfc.sampled_rows
    assert torch.equal(grad.indices()[0], rows) and rows.numel() == 40
    changed = (pfc.weight.detach() != before).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, rows)
    expected = before[rows] - 0.5 * (grad.values() + 1e-3 * before[rows])  # first step: buffer = grad
    assert torch.allclose(pfc.weight.detach()[rows], expected, atol=1e-7)


def test_lr_from_param_groups_and_state_dict_round_trip() -> None:
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(4))
    for name in ("sgd", "adamw"):
        a = torch.nn.Parameter(start.clone())
        opt = build_fc_optimizer([a], name, lr=0.1)
        a.grad = sparse_grad(ROW_SETS[0], 0)
        opt.step()
        b = torch.nn.Parameter(a.detach().clone())
        restored = build_fc_optimizer([b], name, lr=0.1)
        restored.load_state_dict(opt.state_dict())
        for o in (opt, restored):
            o.param_groups[0]["lr"] = 0.0  # the schedule's way of setting the LR
        a.grad, b.grad = sparse_grad(ROW_SETS[1], 1), sparse_grad(ROW_SETS[1], 1)
        frozen = a.detach().clone()
        opt.step()
        restored.step()
        assert torch.equal(a.detach(), b.detach())
        if name == "sgd":  # lr 0: nothing moves (AdamW with lr 0 also decays by 1 - 0 * wd = 1)
            assert torch.equal(a.detach(), frozen)


@pytest.mark.parametrize("kwargs,match", [({"lr": -1.0}, "lr"), ({"lr": 0.1, "momentum": 1.0}, "momentum"),
                                          ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay")])
def test_sgd_rejects_bad_hyper_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RowSGD([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_adamw_rejects_bad_hyper_parameters() -> None:
    with pytest.raises(ValueError, match="betas"):
        RowAdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="eps"):
        RowAdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, eps=0.0)
    default = RowAdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    assert math.isclose(default.defaults["weight_decay"], 1e-2)
