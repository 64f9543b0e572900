"""Every loss family trains: a tiny MLP on Gaussian identity clusters, fed by the P x K sampler, lowers the
loss on fixed held-out batches and separates identities: the same-identity cosine rises above the
different-identity cosine and nearest-neighbour identification of unseen samples works.

The thresholds must hold on any CPU. The hard-mining losses (TriHard, triplets, lifted, distance-weighted
margin) are chaotic: which pair is the hardest flips with the last bits of a sum, so a machine that adds in
another order ends somewhere else. Their spread was measured by perturbing the initial weights by one part
in a million (the size of a summation-order difference) and training again; the problem, step count and
thresholds are chosen so that every statistic stays many of those standard deviations away from its
threshold (``test_margins_hold_under_rounding_sized_perturbations`` re-checks that with 8 runs).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arcface.data.pk_batch_sampler import PKBatchSampler
from arcface.head.margins import build_margin, subcenter_max
from arcface.objectives import losses as L

# Hundreds of tiny matrix products: a second intra-op thread only adds overhead (3x slower under load).
pytestmark = pytest.mark.usefixtures("single_thread")

NUM_IDS, IN_DIM, EMB_DIM, PER_ID, TEST_PER_ID = 8, 16, 8, 40, 20
# Cluster means spread: 1.0 x unit noise. Raw inputs are still poorly separated in cosine (1-NN ~0.49),
# and every family reaches 0.90 or more, far above the asserted 0.8.
MEAN_SPREAD = 1.0
STEPS = 240
DECAY_STEPS = 120  # the learning rate falls linearly to 0 over the last steps: the end state settles
LR = 1e-2
# What every family must achieve on held-out samples (see the module docstring for the margins).
MAX_LOSS_RATIO = 1.0   # loss after / loss before: it must go down
MIN_GAP_GAIN = 0.15    # same-identity minus different-identity mean cosine, after minus before
MIN_NN_ACCURACY = 0.8  # leave-one-out 1-NN identification (chance 1/8)


def _data(noise_seed: int, per_id: int = PER_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters whose means are close relative to the noise: raw inputs are poorly separated in cosine.
    The identities (cluster means) are fixed; ``noise_seed`` draws fresh samples of them."""
    means = torch.randn(NUM_IDS, IN_DIM, generator=torch.Generator().manual_seed(0)) * MEAN_SPREAD + 1.5
    labels = torch.arange(NUM_IDS).repeat_interleave(per_id)
    noise = torch.randn(len(labels), IN_DIM, generator=torch.Generator().manual_seed(noise_seed))
    x = means[labels] + noise
    return x, labels


def _nn_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out nearest neighbour (by cosine) identification accuracy."""
    e = F.normalize(embeddings, dim=1)
    cos = (e @ e.t()).fill_diagonal_(-2.0)
    return float((labels[cos.argmax(dim=1)] == labels).float().mean())


def _cosine_gap(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """mean same-identity cosine minus mean different-identity cosine (pairs i != j)."""
    e = F.normalize(embeddings, dim=1)
    cos = e @ e.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    return float(cos[same & ~eye].mean() - cos[~same].mean())


class Classifier(nn.Module):
    """Normalised class centres (``k`` sub-centres per class) -> margin -> cross-entropy."""

    def __init__(self, margin_name: str, k: int = 1, **overrides) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(NUM_IDS * k, EMB_DIM) * 0.1)
        self.margin = build_margin(margin_name, scale=16.0, **overrides)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos_theta = F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).t()
        if self.k > 1:
            cos_theta = subcenter_max(cos_theta, self.k)
        extra = {}
        if getattr(self.margin, "needs_embedding_norms", False):
            extra["embedding_norms"] = embeddings.norm(dim=1)
        return F.cross_entropy(self.margin(cos_theta, labels, **extra), labels)


class SoftmaxPlusCenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(EMB_DIM, NUM_IDS)
        self.center = L.CenterLoss(NUM_IDS, EMB_DIM)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(embeddings), labels) + 0.05 * self.center(embeddings, labels)


class LSoftmaxLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = L.LSoftmax(EMB_DIM, NUM_IDS, margin=2, base_weight=1.0)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(embeddings, labels), labels)


class Functional(nn.Module):
    """A parameter-free metric loss; fixed generator for the stochastic miners so evaluation is repeatable."""

    def __init__(self, fn: Callable[..., torch.Tensor], **kwargs) -> None:
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fn(embeddings, labels, **self.kwargs)


class MarginDWS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.loss = L.DistanceWeightedMarginLoss(alpha=0.2, beta_init=1.2)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, generator=self.generator)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "normface": lambda: Classifier("softmax"),
    "sphereface": lambda: Classifier("sphereface"),
    "arcface": lambda: Classifier("arcface"),
    "cosface": lambda: Classifier("cosface"),
    "combined": lambda: Classifier("combined"),
    "arcface_straight_through": lambda: Classifier("arcface", gradient="straight_through"),
    "adaface": lambda: Classifier("adaface"),
    "curricularface": lambda: Classifier("curricularface"),
    "subcenter_arcface": lambda: Classifier("arcface", k=3),
    "softmax+center": SoftmaxPlusCenter,
    "lsoftmax": LSoftmaxLoss,
    "contrastive": lambda: Functional(L.batch_contrastive_loss, margin=1.0),
    "triplet_semihard": lambda: Functional(L.triplet_loss, mining="semihard"),
    "triplet_random_violating": lambda: Functional(L.triplet_loss, mining="random_violating",
                                                   generator=torch.Generator().manual_seed(0)),
    # TriHard and lifted on raw (unnormalised) embeddings, as published: on the unit sphere the
    # hardest-pair objectives collapse from this near-degenerate start (every cosine ~0.9)
    "trihard": lambda: Functional(L.batch_hard_triplet_loss, margin=0.3),
    "trihard_soft": lambda: Functional(L.batch_hard_triplet_loss, soft_margin=True),
    "lifted": lambda: Functional(L.lifted_structured_loss, margin=1.0),
    "margin_dws": MarginDWS,
}


def _eval_loss(loss_fn: nn.Module, net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean loss over two fixed held-out batches, each holding half the samples of every identity.

    Batches of every identity (rather than one batch of everything) keep the hardest-pair losses from
    being decided by a single extreme pair of the whole held-out set. The stochastic miners restart their
    generator from the same seeds before and after training and average 8 draws: one draw of "a random
    violating triplet per anchor" moves the mean by more than training does to it.
    """
    per_id = len(labels) // NUM_IDS
    position = torch.arange(len(labels)) % per_id
    generator = loss_fn.generator if isinstance(loss_fn, MarginDWS) else \
        loss_fn.kwargs.get("generator") if isinstance(loss_fn, Functional) else None
    values = []
    with torch.no_grad():
        loss_fn.eval()
        for draw in range(8 if generator is not None else 1):
            if generator is not None:
                generator.manual_seed(123 + draw)
            for half in (position < per_id // 2, position >= per_id // 2):
                values.append(float(loss_fn(net(x[half]), labels[half])))
        loss_fn.train()
    return sum(values) / len(values)


def _train_and_measure(family: str, perturbation_seed: int | None = None) -> dict[str, float]:
    """Train ``family`` from a fixed start; held-out loss, cosine gap and 1-NN accuracy before and after.

    ``perturbation_seed`` multiplies every initial weight by ``1 + 1e-6 * N(0, 1)``: a difference as small
    as another summation order makes, to measure how far the outcome can move on another machine.
    """
    torch.manual_seed(0)
    x_train, y_train = _data(noise_seed=1)
    x_test, y_test = _data(noise_seed=2, per_id=TEST_PER_ID)  # the same identities, unseen samples
    net = nn.Sequential(nn.Linear(IN_DIM, 32), nn.PReLU(), nn.Linear(32, EMB_DIM))
    loss_fn = FAMILIES[family]()
    params = list(net.parameters()) + list(loss_fn.parameters())
    if perturbation_seed is not None:
        generator = torch.Generator().manual_seed(perturbation_seed)
        with torch.no_grad():
            for param in params:
                param.mul_(1 + 1e-6 * torch.randn(param.shape, generator=generator))
    optimizer = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (STEPS - step) / DECAY_STEPS))

    with torch.no_grad():
        gap_before = _cosine_gap(net(x_test), y_test)
        acc_before = _nn_accuracy(net(x_test), y_test)
    loss_before = _eval_loss(loss_fn, net, x_test, y_test)

    sampler = PKBatchSampler(y_train.numpy(), p=4, k=4, seed=0)
    step, epoch = 0, 0
    while step < STEPS:
        sampler.set_epoch(epoch)
        for batch in sampler:
            loss = loss_fn(net(x_train[batch]), y_train[batch])
            assert torch.isfinite(loss), (family, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == STEPS:
                break
        epoch += 1

    with torch.no_grad():
        gap_after = _cosine_gap(net(x_test), y_test)
        acc_after = _nn_accuracy(net(x_test), y_test)
    loss_after = _eval_loss(loss_fn, net, x_test, y_test)
    return {"loss_before": loss_before, "loss_after": loss_after, "gap_before": gap_before,
            "gap_after": gap_after, "acc_before": acc_before, "acc_after": acc_after}


def _check(family: str, m: dict[str, float]) -> None:
    print(f"{family}: loss {m['loss_before']:.4f} -> {m['loss_after']:.4f} "
          f"(ratio {m['loss_after'] / m['loss_before']:.3f}), cos gap {m['gap_before']:.3f} -> "
          f"{m['gap_after']:.3f}, 1-NN {m['acc_before']:.3f} -> {m['acc_after']:.3f}")
    # chance is 1/8 and the start ~0.49 for 1-NN; the problem allows ~0.95
    assert m["loss_after"] < MAX_LOSS_RATIO * m["loss_before"], (family, m)
    assert m["gap_after"] > m["gap_before"] + MIN_GAP_GAIN, (family, m)
    assert m["acc_after"] >= MIN_NN_ACCURACY, (family, m)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_learns_to_separate_identities(family):
    _check(family, _train_and_measure(family))


# The families whose outcome moves at all under a 1e-6 perturbation (the margin-softmax classifiers end
# on the same values to the printed digits).
CHAOTIC = ["trihard", "trihard_soft", "triplet_semihard", "triplet_random_violating", "lifted", "margin_dws"]
MIN_MARGIN_SDS = 4.0


@pytest.mark.slow
@pytest.mark.parametrize("family", CHAOTIC)
def test_margins_hold_under_rounding_sized_perturbations(family):
    """Eight runs from rounding-sized perturbations of the start: every run passes, and every statistic's
    mean lies at least 4 of its standard deviations beyond the threshold, so another machine's summation
    order (another draw from the same spread) cannot flip it. (20 runs measured >= 7.9 of them.)"""
    runs = [_train_and_measure(family, perturbation_seed=seed) for seed in range(8)]
    for seed, m in enumerate(runs):
        _check(f"{family} (perturbation {seed})", m)
    statistics = {
        "loss ratio": ([m["loss_after"] / m["loss_before"] for m in runs], MAX_LOSS_RATIO, -1),
        "cosine gap gain": ([m["gap_after"] - m["gap_before"] for m in runs], MIN_GAP_GAIN, 1),
        "1-NN accuracy": ([m["acc_after"] for m in runs], MIN_NN_ACCURACY, 1),
    }
    for name, (values, threshold, direction) in statistics.items():
        values = torch.tensor(values, dtype=torch.float64)
        mean, sd = float(values.mean()), float(values.std())
        margin = direction * (mean - threshold)
        print(f"{family} {name}: {mean:.3f} +- {sd:.3f} vs {threshold} ({margin / max(sd, 1e-12):.1f} sd)")
        assert margin >= MIN_MARGIN_SDS * sd, (family, name, mean, sd, threshold)
