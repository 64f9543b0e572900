"""Margin softmax family vs direct written-out computations (Python math in float64, one element at a
time), including targets at theta ~ 0, theta + m > pi and cos = +-1; gradients by gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arcface.head.margins import (
    MARGIN_PRESETS,
    AdaFace,
    CombinedMargin,
    CurricularFace,
    build_margin,
    margin_softmax_loss,
    subcenter_max,
)

# (m1 SphereFace, m2 ArcFace, m3 CosFace): the presets and combinations of all three
COMBOS = [(1.0, 0.0, 0.0), (1.35, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2),
          (1.35, 0.3, 0.2), (2.0, 0.5, 0.1), (4.0, 0.0, 0.0), (1.5, 0.0, 0.35)]


def _cosines(batch: int, classes: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cosines with chosen target angles: near 0, mid-range, past pi - m, and exactly +-1."""
    g = torch.Generator().manual_seed(seed)
    cos_theta = torch.rand(batch, classes, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, classes, (batch,), generator=g)
    target_angles = [1e-4, 0.01, 0.5, 1.2, math.pi / 2, 2.5, 2.9, 3.1, 0.0, math.pi]
    for i, angle in enumerate(target_angles[:batch]):
        cos_theta[i, labels[i]] = math.cos(angle)
    cos_theta[0, (labels[0] + 1) % classes] = 1.0  # a negative at cos = +1
    cos_theta[1, (labels[1] + 1) % classes] = -1.0
    return cos_theta.to(dtype), labels


def _combined_reference(cos_theta, labels, s, m1, m2, m3):
    """s*(cos(m1*theta + m2) - m3) at the target while m1*theta + m2 <= pi, else the continued
    cos(theta) - (1 + cos(theta*)) - m3 with theta* = (pi - m2)/m1; s*cos elsewhere."""
    rows = []
    for i, row in enumerate(cos_theta.double().tolist()):
        out = [s * c for c in row]
        y = int(labels[i])
        if y >= 0:
            theta = math.acos(max(-1.0, min(1.0, row[y])))
            theta_star = (math.pi - m2) / m1
            if theta <= theta_star:
                t = math.cos(m1 * theta + m2) - m3
            else:
                t = row[y] - (1 + math.cos(theta_star)) - m3
            out[y] = s * t
        rows.append(out)
    return torch.tensor(rows, dtype=torch.float64)


def _cross_entropy_reference(logits, labels):
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        top = max(row)
        total += -(row[y] - top - math.log(sum(math.exp(v - top) for v in row)))
    return total / len(labels)


@pytest.mark.parametrize("m1,m2,m3", COMBOS)
def test_combined_margin_equals_written_formula(m1, m2, m3):
    cos_theta, labels = _cosines(12, 7, seed=int(10 * m1 + 100 * m2 + 1000 * m3))
    margin = CombinedMargin(64.0, m1, m2, m3)
    want = _combined_reference(cos_theta, labels, 64.0, m1, m2, m3)
    got = margin(cos_theta, labels)
    assert got.dtype == torch.float64
    # clamping one fp64 epsilon inside [-1, 1] moves theta at cos = +-1 by ~2e-8 rad
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-5)
    torch.testing.assert_close(margin_softmax_loss(margin, cos_theta, labels).item(),
                               _cross_entropy_reference(want, labels), rtol=1e-7, atol=1e-6)
    # fp32 input: logits in fp32, within what fp32 cosines resolve near theta = 0
    got32 = margin(cos_theta.float(), labels)
    assert got32.dtype == torch.float32
    want32 = _combined_reference(cos_theta.float(), labels, 64.0, m1, m2, m3)
    torch.testing.assert_close(got32.double(), want32, rtol=1e-5, atol=64 * 5e-4)


def test_rows_without_target_only_scaled_and_filtering():
    cos_theta, labels = _cosines(10, 6, seed=3)
    labels[::3] = -1
    margin = CombinedMargin(30.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.4)
    got = margin(cos_theta, labels)
    want = _combined_reference(cos_theta, labels, 30.0, 1.0, 0.5, 0.0)
    for i in range(10):
        for j in range(6):
            if j != labels[i] and cos_theta[i, j] > 0.4:
                want[i, j] = float("-inf")
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-5)
    assert torch.isinf(got).any()  # the threshold really did remove some negatives
    has = labels >= 0
    loss = F.cross_entropy(got[has], labels[has])
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.item(), _cross_entropy_reference(want[has], labels[has]), rtol=1e-7,
                               atol=1e-7)


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.35, 0.3, 0.2), (2.0, 0.0, 0.0)])
def test_fallback_is_continuous_and_monotone(m1, m2, m3):
    margin = CombinedMargin(1.0, m1, m2, m3)
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    target = margin.target_logit(torch.cos(theta))
    steps = target[1:] - target[:-1]
    assert (steps < 0).all()  # strictly decreasing: a far-away target is never rewarded
    assert steps.abs().max() < 2 * max(m1, 1.0) * (math.pi / 20000) + 1e-9  # no jump at theta*
    join = torch.tensor([math.cos(margin.theta_star)], dtype=torch.float64)
    assert abs(margin.target_logit(join).item() - (-1.0 - m3)) < 1e-6


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.35, 0.3, 0.2), (1.0, 0.0, 0.35), (2.0, 0.5, 0.1)])
def test_exact_gradient_gradcheck(m1, m2, m3):
    # smooth region: targets inside (0, theta*) away from the join, no cos = +-1
    g = torch.Generator().manual_seed(1)
    margin = CombinedMargin(8.0, m1, m2, m3)
    theta_star = margin.theta_star
    labels = torch.tensor([0, 2, 1, 3])
    cos_theta = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    angles = torch.tensor([0.05, 0.4, 0.8, 0.95], dtype=torch.float64) * theta_star
    cos_theta[torch.arange(4), labels] = torch.cos(angles)
    cos_theta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: margin_softmax_loss(margin, c, labels), (cos_theta,))
    # and past the join (fallback branch), where the function is smooth as well
    far = cos_theta.detach().clone()
    far[0, 0] = math.cos(min(math.pi - 0.05, theta_star + 0.1))
    far.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: margin_softmax_loss(margin, c, labels), (far,))


def test_straight_through_gradient_is_plain_softmax_gradient():
    cos_theta, labels = _cosines(8, 5, seed=5)
    exact = CombinedMargin(16.0, 1.0, 0.5, 0.0)
    straight = CombinedMargin(16.0, 1.0, 0.5, 0.0, gradient="straight_through")
    a = cos_theta.clone().requires_grad_(True)
    b = cos_theta.clone().requires_grad_(True)
    loss_exact = margin_softmax_loss(exact, a, labels)
    loss_straight = margin_softmax_loss(straight, b, labels)
    torch.testing.assert_close(loss_straight, loss_exact)  # same forward value
    loss_straight.backward()
    loss_exact.backward()
    # d loss / d cos_ij = s * (softmax_ij - onehot_ij) / B with the margin logits held constant
    logits = _combined_reference(cos_theta, labels, 16.0, 1.0, 0.5, 0.0)
    want = 16.0 * (torch.softmax(logits, dim=1) - F.one_hot(labels, 5)) / len(labels)
    torch.testing.assert_close(b.grad, want, rtol=1e-7, atol=1e-9)
    assert not torch.allclose(a.grad, b.grad)  # the exact gradient really differs
    with pytest.raises(ValueError, match="gradient"):
        CombinedMargin(gradient="nope")


def _all_margins() -> dict[str, torch.nn.Module]:
    out = {name: build_margin(name) for name in MARGIN_PRESETS}
    out["arcface_straight"] = CombinedMargin(gradient="straight_through")
    return out


def _call(margin, cos_theta, labels, norms=None):
    if isinstance(margin, AdaFace):
        return margin(cos_theta, labels, embedding_norms=norms if norms is not None else
                      torch.linspace(5, 40, cos_theta.shape[0]))
    return margin(cos_theta, labels)


@pytest.mark.parametrize("name", sorted(_all_margins()))
def test_safe_at_cos_plus_minus_one(name):
    margin = _all_margins()[name]
    labels = torch.tensor([0, 1, 2, 0])
    cos_theta = torch.tensor([[1.0, -1.0, 0.3], [1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]],
                             requires_grad=True)
    loss = F.cross_entropy(_call(margin, cos_theta, labels), labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cos_theta.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(_all_margins()))
def test_autocast_reduced_precision(name, dtype):
    cos_theta, labels = _cosines(6, 5, seed=9, dtype=torch.float32)
    low = cos_theta.to(dtype).requires_grad_(True)
    margin = _all_margins()[name].eval()
    with torch.autocast("cpu", dtype=dtype):
        logits = _call(margin, low, labels)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.float32  # computed in fp32 whatever the input
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(low.grad.float()).all()
    # identical to the fp32 computation on the same (rounded) cosines
    torch.testing.assert_close(logits, _call(margin, low.detach().float(), labels), rtol=1e-6, atol=1e-5)


def _adaface_reference(cos_theta, labels, norms, s, m, h, mean, std, momentum, eps):
    norms = [min(max(n, 0.001), 100.0) for n in norms]
    batch_mean = sum(norms) / len(norms)
    batch_std = math.sqrt(sum((n - batch_mean) ** 2 for n in norms) / (len(norms) - 1))
    mean = (1 - momentum) * mean + momentum * batch_mean
    std = (1 - momentum) * std + momentum * batch_std
    rows = []
    for i, row in enumerate(cos_theta.tolist()):
        out = [s * c for c in row]
        y = int(labels[i])
        z = min(1.0, max(-1.0, (norms[i] - mean) / (std + eps) * h))
        theta = min(math.pi - 1e-12, max(1e-12, math.acos(row[y]) - m * z))  # angular part: -m*z
        out[y] = s * (math.cos(theta) - (m + m * z))                           # additive part: m + m*z
        rows.append(out)
    return torch.tensor(rows, dtype=torch.float64), mean, std


def test_adaface_equals_written_formula():
    cos_theta, labels = _cosines(8, 6, seed=11)
    cos_theta = cos_theta.clamp(-0.999, 0.999)  # keep away from the clip points for a tight comparison
    norms = torch.tensor([0.5, 3.0, 10.0, 18.0, 20.0, 25.0, 40.0, 150.0], dtype=torch.float64)
    ada = AdaFace(scale=64.0, margin=0.4, h=0.333, momentum=0.3).double()
    mean, std = 20.0, 100.0
    for _ in range(2):  # second call uses the updated running statistics
        want, mean, std = _adaface_reference(cos_theta, labels, norms.tolist(), 64.0, 0.4, 0.333, mean, std,
                                             0.3, 1e-3)
        torch.testing.assert_close(ada(cos_theta, labels, embedding_norms=norms), want, rtol=1e-9, atol=1e-9)
    assert abs(float(ada.batch_mean) - mean) < 1e-9 and abs(float(ada.batch_std) - std) < 1e-9
    with pytest.raises(ValueError, match="embedding_norms"):
        ada(cos_theta, labels)
    ada.eval()
    c = cos_theta.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: F.cross_entropy(ada(x, labels, embedding_norms=norms), labels), (c,))


def _curricular_reference(cos_theta, labels, s, m, t, momentum):
    cos_theta = cos_theta.clamp(-1, 1).tolist()
    targets = [row[int(y)] for row, y in zip(cos_theta, labels)]
    t = (1 - momentum) * t + momentum * sum(targets) / len(targets)
    rows = []
    for row, y, ct in zip(cos_theta, labels.tolist(), targets):
        theta = math.acos(ct)
        cos_theta_m = math.cos(theta + m)
        out = [c * (t + c) if c > cos_theta_m else c for c in row]
        out[y] = cos_theta_m if ct > math.cos(math.pi - m) else ct - math.sin(math.pi - m) * m
        rows.append([s * v for v in out])
    return torch.tensor(rows, dtype=torch.float64), t


def test_curricularface_equals_written_formula_and_splits_by_columns():
    cos_theta, labels = _cosines(10, 6, seed=13)
    cos_theta[cos_theta.abs() == 1.0] = 0.99
    cur = CurricularFace(scale=64.0, margin=0.5, momentum=0.2).double()
    t = 0.0
    for _ in range(2):  # the second call applies the t learned from the first
        want, t = _curricular_reference(cos_theta, labels, 64.0, 0.5, t, 0.2)
        torch.testing.assert_close(cur(cos_theta, labels), want, rtol=1e-8, atol=1e-7)
    # sharded use: columns split in two; the target-less rows get row_target_cos from the caller
    cur_a, cur_b = CurricularFace(margin=0.5).double().eval(), CurricularFace(margin=0.5).double().eval()
    cur.eval()
    cur_a.t.fill_(float(cur.t))
    cur_b.t.fill_(float(cur.t))
    row_target = cos_theta[torch.arange(10), labels]
    full = cur(cos_theta, labels)
    for module, lo, hi in ((cur_a, 0, 3), (cur_b, 3, 6)):
        local = torch.where((labels >= lo) & (labels < hi), labels - lo, torch.full_like(labels, -1))
        part = module(cos_theta[:, lo:hi], local, row_target_cos=row_target)
        torch.testing.assert_close(part, full[:, lo:hi], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="row_target_cos"):
        cur_a(cos_theta[:, :3], torch.full_like(labels, -1))
    # smooth away from cos = +-1 and as long as no negative sits exactly on its row's hard threshold
    c = (torch.rand(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1.6 - 0.8)
    smooth_labels = labels[:5]
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: F.cross_entropy(cur(x, smooth_labels), smooth_labels), (c,))


def test_subcenter_max():
    g = torch.Generator().manual_seed(2)
    cos_k = torch.rand(4, 5 * 3, generator=g) * 2 - 1
    want = torch.tensor([[max(cos_k[i, c * 3 + j].item() for j in range(3)) for c in range(5)]
                         for i in range(4)])
    torch.testing.assert_close(subcenter_max(cos_k, 3), want, rtol=0, atol=0)
    torch.testing.assert_close(subcenter_max(cos_k.view(4, 5, 3), 3), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of k=4"):
        subcenter_max(cos_k, 4)


def test_build_margin_presets_and_errors():
    arc = build_margin("ArcFace", scale=32.0)
    assert isinstance(arc, CombinedMargin) and (arc.m1, arc.m2, arc.m3, arc.scale) == (1.0, 0.5, 0.0, 32.0)
    assert isinstance(build_margin("adaface"), AdaFace)
    assert isinstance(build_margin("curricularface"), CurricularFace)
    assert (build_margin("combined").m2, build_margin("combined").m3) == (0.3, 0.2)
    with pytest.raises(ValueError, match="unknown margin 'arc'.*arcface"):
        build_margin("arc")
    with pytest.raises(ValueError, match="m1 >= 1"):
        CombinedMargin(m1=0.5)
    with pytest.raises(ValueError, match="scale"):
        CombinedMargin(scale=0)


def test_filtered_margin_gradient_matches_finite_differences():
    """With inter-class filtering, dropped negatives get no gradient; everything else the exact one."""
    cos_theta, labels = _cosines(8, 7, seed=5)
    labels[::4] = -1
    margin = CombinedMargin(16.0, 1.0, 0.4, 0.1, interclass_filtering_threshold=0.3)
    dropped = torch.isinf(margin(cos_theta, labels))
    assert dropped.any() and not dropped.all()

    def finite_part(cos: torch.Tensor) -> torch.Tensor:
        return margin(cos, labels).masked_fill(dropped, 0.0)

    assert torch.autograd.gradcheck(finite_part, (cos_theta.clone().requires_grad_(),))
    cos = cos_theta.clone().requires_grad_()
    margin(cos, labels).masked_fill(dropped, 0.0).sum().backward()
    assert bool((cos.grad[dropped] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_curricularface_target_at_cos_pm1_is_the_documented_clamped_formula(dtype):
    """At cos = +-1 the cosine is clamped one epsilon of the compute dtype inside [-1, 1] (as the module
    docstring says), then ``s * cos(acos(c) + m)``: the reference is computed here in float64 from that
    clamped cosine, with no code shared with the module."""
    scale, margin = 64.0, 0.5
    eps = torch.finfo(dtype).eps
    cur = CurricularFace(scale=scale, margin=margin).to(dtype).eval()
    # the targets at 1, 1 - tiny, mid-range; the negatives well away from every row's hard threshold
    targets = [1.0, 1.0 - eps / 4, 0.3, -1.0]
    cos_theta = torch.full((len(targets), 3), -0.95, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 0])
    for row, value in enumerate(targets):
        cos_theta[row, labels[row]] = value
    logits = cur(cos_theta, labels)
    for row, value in enumerate(targets):
        stored = float(torch.tensor(value, dtype=dtype))  # what the module actually received
        clamped = min(max(stored, -1.0 + eps), 1.0 - eps)
        if clamped > math.cos(math.pi - margin):
            want = scale * math.cos(math.acos(clamped) + margin)
        else:  # ArcFace's fallback past theta + m > pi (uses the unclamped cosine)
            want = scale * (stored - math.sin(math.pi - margin) * margin)
        got = float(logits[row, labels[row]])
        # fp32 logits near 56 are exact to a few 1e-6; the unclamped-sin_squared variant is 4.4e-3 off
        assert abs(got - want) <= (2e-5 if dtype == torch.float32 else 1e-9), (value, got, want)
    # the clamp keeps the gradient finite at cos = 1 exactly
    c = cos_theta.clone().requires_grad_(True)
    F.cross_entropy(cur(c, labels), labels).backward()
    assert torch.isfinite(c.grad).all()
