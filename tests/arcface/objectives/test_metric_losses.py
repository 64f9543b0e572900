"""arcface.objectives.losses and arcface.data.pk_batch_sampler against written-out references: brute-force
loops over pairs and triplets, hand-built embedding sets whose mined triplets follow from the definitions,
closed-form center loss / L-Softmax, sampling frequencies, and the numerical edge cases (one image per
identity, coincident
and antipodal embeddings, bf16/fp16 autocast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcface.data.pk_batch_sampler import PKBatchSampler
from arcface.objectives import losses as L

DT = torch.float64


def _dist(a: torch.Tensor, b: torch.Tensor, squared: bool = False) -> torch.Tensor:
    d2 = ((a - b) ** 2).sum()
    return d2 if squared else torch.sqrt(d2)


def _batch(seed: int = 0, n_ids: int = 4, per_id: int = 3, dim: int = 6, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    centres = torch.randn(n_ids, dim, generator=g, dtype=dtype)
    x = centres[labels] * 0.8 + 0.6 * torch.randn(len(labels), dim, generator=g, dtype=dtype)
    return x, labels


# ---------------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("squared", [False, True])
def test_pairwise_distances_match_loop_and_are_safe_at_zero(squared):
    x, _ = _batch()
    x = torch.cat([x, x[:1]])  # a duplicate: distance exactly 0 off the diagonal
    d = L.pairwise_distances(x, squared=squared)
    ref = torch.stack([torch.stack([_dist(a, b, squared) for b in x]) for a in x])
    torch.testing.assert_close(d, ref, atol=1e-9, rtol=1e-9)
    x = x.clone().requires_grad_(True)
    L.pairwise_distances(x, squared=squared).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------
# triplet mining on a hand-built set
# ---------------------------------------------------------------------------------------------------
# 1-D points: identity A at 0.0 and 0.5, identity B at 0.55, 0.8, -0.1; margin 0.2.
POINTS = torch.tensor([[0.0], [0.5], [0.55], [0.8], [-0.1]], dtype=DT)
POINT_LABELS = torch.tensor([0, 0, 1, 1, 1])
# Worked out by hand from the definitions (see mine_triplets' docstring):
#  (0,1): d_ap=.5; negatives at .55,.8,.1 -> semi-hard (.5,.7): 2; hardest: 4; violating (<.7): 2,4
#  (1,0): d_ap=.5; negatives at .05,.3,.6 -> semi-hard: 4; hardest: 2; violating: 2,3,4
#  (2,3): d_ap=.25; negatives at .55,.05 -> semi-hard (.25,.45): none; hardest 1; violating: 1
#  (2,4): d_ap=.65; negatives .55,.05 -> none; hardest 1; violating 0,1
#  (3,2): d_ap=.25; negatives .8,.3 -> semi-hard: 1; hardest 1; violating 1
#  (3,4): d_ap=.9; negatives .8,.3 -> none; hardest 1; violating 0,1
#  (4,2): d_ap=.65; negatives .1,.6 -> none; hardest 0; violating 0,1
#  (4,3): d_ap=.9; negatives .1,.6 -> none; hardest 0; violating 0,1
EXPECTED_SEMIHARD = [(0, 1, 2), (1, 0, 4), (3, 2, 1)]
EXPECTED_HARDEST = [(0, 1, 4), (1, 0, 2), (2, 3, 1), (2, 4, 1), (3, 2, 1), (3, 4, 1), (4, 2, 0), (4, 3, 0)]
EXPECTED_VIOLATING = {(0, 1): {2, 4}, (1, 0): {2, 3, 4}, (2, 3): {1}, (2, 4): {0, 1}, (3, 2): {1},
                      (3, 4): {0, 1}, (4, 2): {0, 1}, (4, 3): {0, 1}}


def _hand_distances() -> torch.Tensor:
    return (POINTS - POINTS.t()).abs()


def test_semihard_and_hardest_mining_on_hand_built_set():
    d = _hand_distances()
    semi = L.mine_triplets(d, POINT_LABELS, margin=0.2, mining="semihard")
    assert [tuple(t) for t in semi.tolist()] == EXPECTED_SEMIHARD
    hard = L.mine_triplets(d, POINT_LABELS, margin=0.2, mining="hardest")
    assert [tuple(t) for t in hard.tolist()] == EXPECTED_HARDEST


def test_random_violating_mining_picks_uniformly_among_violators():
    d = _hand_distances()
    counts: dict[tuple[int, int], dict[int, int]] = {k: {} for k in EXPECTED_VIOLATING}
    g = torch.Generator().manual_seed(0)
    draws = 600
    for _ in range(draws):
        trip = L.mine_triplets(d, POINT_LABELS, margin=0.2, mining="random_violating", generator=g)
        assert {(a, p) for a, p, _ in trip.tolist()} == set(EXPECTED_VIOLATING)
        for a, p, n in trip.tolist():
            assert n in EXPECTED_VIOLATING[(a, p)]
            counts[(a, p)][n] = counts[(a, p)].get(n, 0) + 1
    for pair, allowed in EXPECTED_VIOLATING.items():
        assert set(counts[pair]) == allowed  # every violator gets picked
        for n in allowed:  # uniform: 600/|allowed| each, 5 sigma band
            mean = draws / len(allowed)
            sigma = math.sqrt(draws * (1 / len(allowed)) * (1 - 1 / len(allowed))) or 1.0
            assert abs(counts[pair][n] - mean) < 5 * sigma


def _loop_mine(d, labels, margin, mining):
    """The definitions as loops (independent of the vectorised masks)."""
    out = []
    b = len(labels)
    for a, p in itertools.product(range(b), range(b)):
        if a == p or labels[a] != labels[p]:
            continue
        negs = [n for n in range(b) if labels[n] != labels[a]]
        if mining == "all":
            out += [(a, p, n) for n in negs]
            continue
        if mining == "semihard":
            negs = [n for n in negs if d[a, p] < d[a, n] < d[a, p] + margin]
        if negs:
            out.append((a, p, min(negs, key=lambda n: (float(d[a, n]), n))))
    return out


@pytest.mark.parametrize("mining", ["all", "semihard", "hardest"])
@pytest.mark.parametrize("squared", [True, False])
def test_triplet_loss_equals_brute_force_loop(mining, squared):
    x, labels = _batch(seed=1, n_ids=4, per_id=3, dim=5)
    margin = 0.2 if squared else 0.3
    xn = F.normalize(x, dim=1)
    d = torch.stack([torch.stack([_dist(a, b, squared) for b in xn]) for a in xn])
    mined = L.mine_triplets(L.pairwise_distances(xn, squared=squared), labels, margin=margin, mining=mining)
    expected = _loop_mine(d, labels.tolist(), margin, mining)
    assert [tuple(t) for t in mined.tolist()] == expected
    assert len(expected) > 0

    x1 = x.clone().requires_grad_(True)
    loss = L.triplet_loss(x1, labels, margin, mining=mining, squared=squared)
    loss.backward()
    x2 = x.clone().requires_grad_(True)
    x2n = F.normalize(x2, dim=1)
    terms = [torch.clamp(_dist(x2n[a], x2n[p], squared) - _dist(x2n[a], x2n[n], squared) + margin, min=0)
             for a, p, n in expected]
    ref = torch.stack(terms).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_batch_hard_equals_loop(squared, soft_margin):
    x, labels = _batch(seed=2, n_ids=3, per_id=4, dim=4)
    x = torch.cat([x, torch.randn(1, 4, dtype=DT)])  # a singleton identity: an anchor with no positive
    labels = torch.cat([labels, torch.tensor([99])])
    x1 = x.clone().requires_grad_(True)
    loss = L.batch_hard_triplet_loss(x1, labels, 0.3, squared=squared, soft_margin=soft_margin)
    loss.backward()
    x2 = x.clone().requires_grad_(True)
    terms = []
    for a in range(len(labels)):
        pos = [_dist(x2[a], x2[p], squared) for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [_dist(x2[a], x2[n], squared) for n in range(len(labels)) if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        gap = torch.stack(pos).max() - torch.stack(neg).min()
        terms.append(torch.log1p(torch.exp(gap)) if soft_margin else torch.clamp(gap + 0.3, min=0))
    ref = torch.stack(terms).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=1e-8)


def test_lifted_structured_equals_loop_and_gradcheck():
    x, labels = _batch(seed=3, n_ids=3, per_id=3, dim=4)
    margin = 1.0
    ref = []
    b = len(labels)
    for i, j in itertools.combinations(range(b), 2):
        if labels[i] != labels[j]:
            continue
        s = sum(torch.exp(margin - _dist(x[i], x[k])) for k in range(b) if labels[k] != labels[i])
        s = s + sum(torch.exp(margin - _dist(x[j], x[k])) for k in range(b) if labels[k] != labels[j])
        ref.append(torch.clamp(torch.log(s) + _dist(x[i], x[j]), min=0) ** 2)
    expected = torch.stack(ref).sum() / (2 * len(ref))
    torch.testing.assert_close(L.lifted_structured_loss(x, labels, margin), expected, atol=1e-10, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda e: L.lifted_structured_loss(e, labels, margin),
                                    (x.clone().requires_grad_(True),))


def test_contrastive_losses_equal_formula_and_gradcheck():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, 3, generator=g, dtype=DT), torch.randn(7, 3, generator=g, dtype=DT)
    same = torch.tensor([1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    margin = 2.5
    terms = [0.5 * _dist(a[i], b[i]) ** 2 if same[i]
             else 0.5 * torch.clamp(margin - _dist(a[i], b[i]), min=0) ** 2 for i in range(7)]
    torch.testing.assert_close(L.contrastive_loss(a, b, same, margin), torch.stack(terms).mean())
    assert torch.autograd.gradcheck(lambda u, v: L.contrastive_loss(u, v, same, margin),
                                    (a.clone().requires_grad_(True), b.clone().requires_grad_(True)))

    x, labels = _batch(seed=5, n_ids=3, per_id=2, dim=3)
    xn = F.normalize(x, dim=1)
    pos, neg = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        d = _dist(xn[i], xn[j])
        (pos if labels[i] == labels[j] else neg).append(d)
    ref = 0.5 * (torch.stack(pos) ** 2).mean()
    ref = ref + 0.5 * (torch.clamp(1.0 - torch.stack(neg), min=0) ** 2).mean()
    torch.testing.assert_close(L.batch_contrastive_loss(x, labels, 1.0), ref)


# ---------------------------------------------------------------------------------------------------
# distance-weighted sampling + margin loss
# ---------------------------------------------------------------------------------------------------

def test_distance_weights_closed_form_and_fallbacks():
    n_dim = 16
    d = torch.tensor([[0.0, 0.3, 0.9, 1.2, 1.6],
                      [0.3, 0.0, 1.0, 1.5, 1.45],
                      [0.9, 1.0, 0.0, 0.7, 0.8],
                      [1.2, 1.5, 0.7, 0.0, 0.6],
                      [1.6, 1.45, 0.8, 0.6, 0.0]], dtype=DT)
    labels = torch.tensor([0, 0, 1, 2, 2])
    w = L.distance_weights(d, labels, n_dim, cutoff=0.5, nonzero_loss_cutoff=1.4)

    def q_inv(dist):  # 1 / q(d), d clamped at the cutoff
        dist = max(dist, 0.5)
        return dist ** (-(n_dim - 2)) * (1 - dist * dist / 4) ** (-(n_dim - 3) / 2)

    # row 0: negatives 2, 3, 4; 4 is beyond 1.4 -> 0
    raw = np.array([0, 0, q_inv(0.9), q_inv(1.2), 0.0])
    np.testing.assert_allclose(w[0].numpy(), raw / raw.sum(), rtol=1e-10)
    # row 1: negatives 2 (1.0), 3 (1.5, too far), 4 (1.45, too far)
    np.testing.assert_allclose(w[1].numpy(), [0, 0, 1, 0, 0], atol=1e-12)
    # row 2: negatives 0,1,3,4 all usable; 0.7 and 0.8 compared after the 0.5 cutoff
    raw = np.array([q_inv(0.9), q_inv(1.0), 0, q_inv(0.7), q_inv(0.8)])
    np.testing.assert_allclose(w[2].numpy(), raw / raw.sum(), rtol=1e-10)
    # every negative of a row too far: uniform over its negatives
    far = torch.full((3, 3), 1.9, dtype=DT).fill_diagonal_(0)
    w = L.distance_weights(far, torch.tensor([0, 1, 1]), n_dim)
    np.testing.assert_allclose(w[0].numpy(), [0, 0.5, 0.5])
    # no negatives at all: zeros, not NaN
    w = L.distance_weights(far, torch.tensor([0, 0, 0]), n_dim)
    assert torch.equal(w, torch.zeros_like(w))
    # 128-d: 1/q spans >300 orders of magnitude; log-space keeps it finite and normalised
    w = L.distance_weights(d, labels, 128)
    assert torch.isfinite(w).all() and torch.allclose(w.sum(1)[:3], torch.ones(3, dtype=DT))


def test_distance_weighted_sampling_frequencies():
    d = torch.tensor([[0.0, 0.2, 0.6, 0.9, 1.3]], dtype=DT).repeat(5, 1)
    labels = torch.tensor([0, 0, 1, 2, 3])
    probs = L.distance_weights(d, labels, 8)[0]
    loss = L.DistanceWeightedMarginLoss()
    g = torch.Generator().manual_seed(0)
    triplets = torch.cat([loss.sample(d, labels, 8, g) for _ in range(4000)])
    picks = triplets[triplets[:, 0] == 0, 2]  # anchor 0's negatives: 4000 draws, 5 sigma band
    assert len(picks) == 4000
    freq = torch.bincount(picks, minlength=5).double() / len(picks)
    sigma = torch.sqrt(probs * (1 - probs) / 4000)
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-12), (freq, probs)


@pytest.mark.parametrize("num_classes", [None, 4])
def test_margin_loss_equals_loop_on_sampled_pairs(num_classes):
    x, labels = _batch(seed=6, n_ids=4, per_id=3, dim=8)
    module = L.DistanceWeightedMarginLoss(alpha=0.2, beta_init=1.0, num_classes=num_classes, nu=0.01)
    module = module.double()
    with torch.no_grad():
        module.beta.copy_(torch.linspace(0.9, 1.2, module.beta.numel(), dtype=DT))
    loss = module(x, labels, generator=torch.Generator().manual_seed(7))
    loss.backward()
    xn = F.normalize(x, dim=1)
    triplets = module.sample(L.pairwise_distances(xn), labels, 8, torch.Generator().manual_seed(7))
    assert len(triplets) == 4 * 3 * 2  # every anchor-positive pair
    beta = module.beta.detach()
    total, active, betas = 0.0, 0, []
    for a, p, n in triplets.tolist():
        b = float(beta[labels[a]] if num_classes else beta[0])
        betas.append(b)
        lp = max(0.2 + float(_dist(xn[a], xn[p])) - b, 0.0)
        ln = max(0.2 + b - float(_dist(xn[a], xn[n])), 0.0)
        total += lp + ln
        active += (lp > 0) + (ln > 0)
    expected = total / max(active, 1) + 0.01 * float(np.mean(betas))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert module.beta.grad is not None and module.beta.grad.abs().sum() > 0  # beta is learned


# ---------------------------------------------------------------------------------------------------
# fused margin cross-entropy vs the modular margin module + F.cross_entropy
# ---------------------------------------------------------------------------------------------------

FUSED_CASES = [("softmax", {}), ("sphereface", {}), ("sphereface", {"m1": 4.0}), ("arcface", {}),
               ("cosface", {}), ("combined", {}), ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.1}),
               ("arcface", {"gradient": "straight_through"}),
               ("arcface", {"interclass_filtering_threshold": 0.4})]


def _fused_inputs(seed: int, b: int = 24, n: int = 30):
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(b, n, generator=g, dtype=DT) * 2 - 1
    labels = torch.randint(0, n, (b,), generator=g)
    labels[::5] = -1                                     # target not in these columns: ignored
    targets = [1.0, -1.0, 1 - 1e-9, math.cos(0.01), math.cos(2.9), math.cos(math.pi - 0.3)]
    for row, value in zip((1, 2, 3, 4, 6, 7), targets, strict=True):  # theta ~ 0, theta + m > pi, cos = +-1
        cos[row, labels[row]] = value
    return cos, labels


@pytest.mark.parametrize("name,overrides", FUSED_CASES)
def test_fused_margin_cross_entropy_equals_modular_path(name, overrides):
    from arcface.head.margins import build_margin

    margin = build_margin(name, **overrides)
    cos, labels = _fused_inputs(11)
    c1, c2 = cos.clone().requires_grad_(True), cos.clone().requires_grad_(True)
    reference = F.cross_entropy(margin(c1, labels), labels, ignore_index=-1)
    reference.backward()
    fused = L.margin_cross_entropy(c2, labels, margin)
    fused.backward()
    torch.testing.assert_close(fused, reference, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c2.grad, c1.grad, atol=1e-10, rtol=1e-9)  # acos slope ~2e4 at theta ~ 0
    assert torch.isfinite(c2.grad).all()


def test_fused_margin_cross_entropy_gradcheck_and_edges():
    from arcface.head.margins import AdaFace, build_margin

    margin = build_margin("arcface", scale=8.0)
    g = torch.Generator().manual_seed(12)
    cos = (torch.rand(5, 7, generator=g, dtype=DT) * 1.6 - 0.8).requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 6, 2])
    assert torch.autograd.gradcheck(lambda c: L.margin_cross_entropy(c, labels, margin), (cos,))
    # every row ignored: 0, finite zero gradient
    c = cos.detach().clone().requires_grad_(True)
    loss = L.margin_cross_entropy(c, torch.full((5,), -1), margin)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(c.grad, torch.zeros_like(c.grad))
    # bf16 under autocast: fp32 result equal to fp32 on the rounded values
    low = cos.detach().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = L.margin_cross_entropy(low.clone().requires_grad_(True), labels, margin)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, L.margin_cross_entropy(low.float(), labels, margin))
    with pytest.raises(ValueError, match="CombinedMargin"):
        L.margin_cross_entropy(cos, labels, AdaFace())


# ---------------------------------------------------------------------------------------------------
# center loss and L-Softmax
# ---------------------------------------------------------------------------------------------------

def test_center_loss_value_gradient_and_paper_update():
    x, labels = _batch(seed=8, n_ids=3, per_id=2, dim=4)
    labels = torch.tensor([0, 0, 2, 2, 2, 1])
    module = L.CenterLoss(4, 4).double()
    c = module.centers.detach().clone()
    expected = 0.5 * torch.stack([((x[i] - c[labels[i]]) ** 2).sum() for i in range(6)]).mean()
    loss = module(x, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad_ref = torch.zeros_like(c)
    for i in range(6):
        grad_ref[labels[i]] -= (x[i] - c[labels[i]]) / 6
    torch.testing.assert_close(module.centers.grad, grad_ref)

    paper = L.CenterLoss(4, 4, update="paper", alpha=0.5).double()
    c = paper.centers.clone()
    paper(x, labels)
    for j in range(4):
        rows = [i for i in range(6) if labels[i] == j]
        step = sum((x[i] - c[j] for i in rows), torch.zeros(4, dtype=DT)) / (1 + len(rows))
        torch.testing.assert_close(paper.centers[j], c[j] + 0.5 * step)  # class 3 absent: unchanged
    paper.eval()
    before = paper.centers.clone()
    paper(x, labels)
    assert torch.equal(paper.centers, before)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        module(x, torch.tensor([0, 0, 1, 1, 4, 2]))


def test_lsoftmax_psi_properties():
    theta = torch.linspace(0, math.pi, 2001, dtype=DT)
    for m in (1, 2, 3, 4):
        psi = L.lsoftmax_psi(theta, m)
        assert torch.all(psi[1:] <= psi[:-1] + 1e-12)  # monotone decreasing
        torch.testing.assert_close(psi[theta < math.pi / m], torch.cos(m * theta[theta < math.pi / m]))
        assert psi[-1].item() == pytest.approx(-(2 * m - 1))  # end value (-1)^k cos(m pi) - 2k, k = m-1
        assert torch.all((psi - torch.cos(theta)) <= 1e-12)  # never easier than the plain target


@pytest.mark.parametrize("margin", [1, 2, 4])
def test_lsoftmax_logits_equal_written_formula(margin):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 5, generator=g, dtype=DT)
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    module = L.LSoftmax(5, 4, margin, base_weight=0.5).double()
    w = module.weight.detach()
    logits = module(x, labels)
    for i in range(6):
        for j in range(4):
            plain = float(w[j] @ x[i])
            if j == labels[i] and margin > 1:
                norms = float(w[j].norm() * x[i].norm())
                theta = math.acos(plain / norms)
                k = min(int(theta * margin / math.pi), margin - 1)
                psi = (-1) ** k * math.cos(margin * theta) - 2 * k
                expected = (0.5 * plain + norms * psi) / 1.5
            else:
                expected = plain
            assert logits[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert torch.autograd.gradcheck(lambda e: module(e, labels), (x.clone().requires_grad_(True),))


# ---------------------------------------------------------------------------------------------------
# edge cases shared by every loss
# ---------------------------------------------------------------------------------------------------

def _all_losses():
    torch.manual_seed(0)
    center = L.CenterLoss(16, 4)
    lsoft = L.LSoftmax(4, 16, 3)
    dwm = L.DistanceWeightedMarginLoss()
    return {
        "center": lambda e, y: center(e, y),
        "lsoftmax": lambda e, y: F.cross_entropy(lsoft(e, y), y),
        "contrastive": L.batch_contrastive_loss,
        "triplet_semihard": L.triplet_loss,
        "triplet_hardest": lambda e, y: L.triplet_loss(e, y, mining="hardest"),
        "triplet_random": lambda e, y: L.triplet_loss(e, y, mining="random_violating"),
        "triplet_all": lambda e, y: L.triplet_loss(e, y, mining="all"),
        "trihard": L.batch_hard_triplet_loss,
        "trihard_soft_sq": lambda e, y: L.batch_hard_triplet_loss(e, y, squared=True, soft_margin=True),
        "lifted": L.lifted_structured_loss,
        "margin_dws": lambda e, y: dwm(e, y),
    }


@pytest.mark.parametrize("name", sorted(_all_losses()))
def test_edge_cases_no_nan(name):
    fn = _all_losses()[name]
    # triplet-style losses need a positive AND a negative; contrastive uses either kind of pair alone
    needs_both = name not in ("center", "lsoftmax", "contrastive")
    cases = {
        "one image per identity": (torch.randn(6, 4), torch.arange(6)),
        "one identity only": (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)),
        "coincident (cos = +1)": (torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])),
        "antipodal (cos = -1)": (torch.tensor([[1.0, 0, 0, 0]] * 3 + [[-1.0, 0, 0, 0]] * 3),
                                 torch.tensor([0, 0, 0, 1, 1, 1])),
        "zero embeddings": (torch.zeros(4, 4), torch.tensor([0, 0, 1, 1])),
    }
    for case, (e, y) in cases.items():
        e = e.clone().requires_grad_(True)
        loss = fn(e, y)
        loss.backward()
        assert torch.isfinite(loss), (case, loss)
        assert e.grad is not None and torch.isfinite(e.grad).all(), case
        if needs_both and case in ("one image per identity", "one identity only"):
            assert loss.item() == 0.0, case  # nothing to contrast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(_all_losses()))
def test_autocast_reduced_precision(name, dtype):
    fn = _all_losses()[name]
    x, labels = _batch(seed=10, n_ids=4, per_id=3, dim=4, dtype=torch.float32)
    x_low = x.to(dtype)
    torch.manual_seed(1)
    ref = fn(x_low.float(), labels)  # same (rounded) values in fp32
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype):
        e = x_low.clone().requires_grad_(True)
        loss = fn(e, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(e.grad.float()).all()
    torch.testing.assert_close(loss, ref, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------------
# P x K sampler
# ---------------------------------------------------------------------------------------------------

def test_pk_sampler_batches_and_epochs():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(11), rng.integers(1, 7, size=11))
    rng.shuffle(labels)
    sampler = PKBatchSampler(labels, p=3, k=4, seed=5)
    assert len(sampler) == 11 // 3
    batches = list(sampler)
    assert len(batches) == 3
    seen = []
    for batch in batches:
        ids = labels[batch]
        assert len(batch) == 12
        groups = [ids[i * 4:(i + 1) * 4] for i in range(3)]
        assert all(len(set(g)) == 1 for g in groups)  # identity-major: K of each
        idents = [int(g[0]) for g in groups]
        assert len(set(idents)) == 3
        seen += idents
        for g_start, ident in zip(range(0, 12, 4), idents, strict=True):
            members = batch[g_start:g_start + 4]
            n_avail = int((labels == ident).sum())
            # without replacement whenever the identity has >= K images
            assert len(set(members)) == min(4, n_avail)
    assert len(set(seen)) == len(seen)  # an identity at most once per epoch
    assert list(sampler) == batches  # deterministic
    # as a DataLoader batch_sampler: the loader yields exactly these batches
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.as_tensor(labels), torch.arange(len(labels)))
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == 3
    assert [idx.tolist() for _, idx in loader] == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_pk_sampler_min_images_replicas_and_errors():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7])
    sampler = PKBatchSampler(labels, p=2, k=2, min_images=2, seed=1)
    assert 1 not in sampler.identities
    everything = [b for b in sampler]
    shards = [list(PKBatchSampler(labels, p=2, k=2, min_images=2, seed=1, num_replicas=2, rank=r))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 1  # 7 identities -> 3 batches -> 1 each, 1 dropped
    assert shards[0] == [everything[0]] and shards[1] == [everything[1]]
    with pytest.raises(ValueError, match="P=9 identities"):
        PKBatchSampler(labels, p=9, k=2)
    with pytest.raises(ValueError, match="1-D"):
        PKBatchSampler(labels.reshape(2, -1), p=2, k=2)
    with pytest.raises(ValueError, match="integers"):
        PKBatchSampler(labels.astype(float), p=2, k=2)
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler(labels, p=2, k=2, num_replicas=2, rank=2)
