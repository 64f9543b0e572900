"""Pair and triplet objectives (arcface.objectives.pairwise and .joint) against independent references.

References:

* the single-device loss functions of :mod:`arcface.objectives.losses` applied to the WHOLE global
  batch in float64 (square ``[B, B]`` distance matrices and their own mining, autograd for the gradients);
* a FaceNet semi-hard example worked out by hand;
* for the distance-weighted sampling, the reference probabilities
  ``arcface.objectives.losses.distance_weights``;
* for training, an uninterrupted run (exact resume) and a one-process run (W = 2 training).

W-rank checks: every rank builds the objective from the config, gets its slice of the global batch, and
its loss and local embedding gradients must equal the one-process ones on the whole batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arcface.objectives import losses as L
from tests.arcface.test_train_loop import backbone_state, tiny_factory
from tests.dist_utils import run_distributed

NUM_CLASSES = 29
DIM = 8

# name -> config overrides; every objective and every mining option
CASES: dict[str, list[str]] = {
    "triplet/semihard": ["loss.kind=triplet"],
    "triplet/semihard/euclidean": ["loss.kind=triplet", "loss.triplet_distance=euclidean",
                                   "loss.triplet_margin=0.3"],
    "triplet/batch_hard": ["loss.kind=triplet", "loss.triplet_mining=batch_hard",
                           "loss.triplet_distance=euclidean", "loss.triplet_margin=0.3"],
    "triplet/batch_hard/raw": ["loss.kind=triplet", "loss.triplet_mining=batch_hard",
                               "loss.triplet_distance=euclidean", "loss.triplet_normalize=false"],
    "triplet/soft_margin": ["loss.kind=triplet", "loss.triplet_mining=soft_margin"],
    "contrastive": ["loss.kind=contrastive", "loss.contrastive_margin=1.2"],
    "lifted": ["loss.kind=lifted", "loss.lifted_margin=1.0"],
    "margin": ["loss.kind=margin", "loss.margin_nu=0.1", "loss.margin_beta_init=1.1"],
    "softmax+contrastive": ["loss.kind=softmax+contrastive", "loss.margin=softmax", "loss.m2=0.0",
                            "loss.joint_weight=0.5", "loss.contrastive_margin=0.9"],
}


def objective_cfg(name: str):  # noqa: ANN201
    from arcface.config import load_config

    return load_config(None, [f"backbone.embedding_size={DIM}", "runtime.device=cpu", *CASES[name]])


def dense_reference(name: str, x: torch.Tensor, y: torch.Tensor,
                    margin_triplets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss and gradient of the whole batch by arcface.objectives.losses (float64 unless the case's FC
    is fp32)."""
    x = x.detach().clone().requires_grad_()
    beta_grad = None
    if name.startswith("triplet/semihard"):
        squared = not name.endswith("euclidean")
        loss = L.triplet_loss(x, y, 0.2 if squared else 0.3, mining="semihard", squared=squared)
    elif name == "triplet/batch_hard":
        loss = L.batch_hard_triplet_loss(x, y, 0.3, squared=False, normalize=True)
    elif name == "triplet/batch_hard/raw":
        loss = L.batch_hard_triplet_loss(x, y, 0.2, squared=False, normalize=False)
    elif name == "triplet/soft_margin":
        loss = L.batch_hard_triplet_loss(x, y, squared=True, soft_margin=True, normalize=True)
    elif name == "contrastive":
        loss = L.batch_contrastive_loss(x, y, 1.2)
    elif name == "lifted":
        loss = L.lifted_structured_loss(x, y, 1.0)
    elif name == "margin":
        # The dense loss on the negatives the objective drew (the draw itself is checked separately
        # against the reference probabilities, and across world sizes).
        ref = L.DistanceWeightedMarginLoss(0.2, 1.1, nu=0.1)
        ref.sample = lambda *args, **kwargs: margin_triplets  # type: ignore[method-assign]
        loss = ref(x, y)
    elif name == "softmax+contrastive":
        from arcface.head.partial_fc import init_fc_weight
        from arcface.head.partition import ClassPartition

        cfg = objective_cfg(name)
        weight = init_fc_weight(ClassPartition(NUM_CLASSES, 1, 0), DIM, cfg.runtime.seed).double()
        cos_theta = F.normalize(x) @ F.normalize(weight).t()
        loss = F.cross_entropy(64.0 * cos_theta, y) + 0.5 * L.batch_contrastive_loss(x, y, 0.9)
    else:  # pragma: no cover
        raise KeyError(name)
    loss.backward()
    if name == "margin":
        beta_grad = ref.beta.grad.clone()
    return {"loss": loss.detach(), "grad": x.grad, "beta_grad": beta_grad}


def make_batch(global_batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 embeddings; the first two thirds from 4 identities (several images each), the last third
    identities seen once (so at W = 3 one rank has no anchor-positive pair of its own and only serves as
    negatives)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(global_batch, DIM, generator=generator, dtype=torch.float64)
    repeated = global_batch * 2 // 3
    labels = torch.cat([torch.randint(0, 4, (repeated,), generator=generator),
                        torch.arange(10, 10 + global_batch - repeated)])
    return x, labels


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation relative to the reference's largest magnitude (exact zeros must match exactly)."""
    scale = ref.abs().max().item()
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


# ------------------------------------------------------------------ the hand-worked semi-hard example

def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Six unit vectors in 2-D at the given angles; three identities A, B, C."""
    degrees = torch.tensor([0.0, 20.0, -25.0, 30.0, 10.0, 180.0], dtype=torch.float64)
    radians = degrees * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1), torch.tensor([0, 0, 1, 1, 2, 2])


# FaceNet's rule, margin 0.2, squared distances of unit vectors d = 2 - 2 cos(angle between them):
#   20 deg -> 0.1206, 25 -> 0.1874, 30 -> 0.2679, 10 -> 0.0304, 35 -> 0.3617, 45 -> 0.5858,
#   55 -> 0.8528, 150 -> 3.7321, 155 -> 3.8126, 160 -> 3.8794, 170 -> 3.9392, 180 -> 4.0
# A pair (a, p) takes the closest negative n with d(a,p) < d(a,n) < d(a,p) + 0.2:
#   (0, 1)  d_ap = 0.1206, window (0.121, 0.321): negatives 2 (0.187), 3 (0.268) inside, 4 (0.030) is
#           HARDER than the positive (skipped), 5 (4.0) outside -> the closest inside, 2: (0, 1, 2)
#   (1, 0)  d_ap = 0.1206: negatives 2 (45 deg, 0.586) beyond, 3 and 4 (10 deg, 0.030) harder, 5 far
#           -> no triplet
#   (2, 3)  d_ap = 0.8528, window (0.853, 1.053): negatives 0.187, 0.586, 0.362, 3.813 -> none
#   (3, 2)  d_ap = 0.8528: negatives 0.268, 0.030, 0.121, 3.732 -> none
#   (4, 5)  d_ap = 3.9392, window (3.939, 4.139): negatives 0.030, 0.030, 0.362, 0.121 -> none
#   (5, 4)  d_ap = 3.9392: negatives 0 (4.0) inside; 1 (3.879), 2 (3.813), 3 (3.732) harder -> (5, 4, 0)
HAND_TRIPLETS = [[0, 1, 2], [5, 4, 0]]
# loss = mean of (0.1206 - 0.1874 + 0.2, 3.9392 - 4.0 + 0.2), computed from the angles:
_d = [2 - 2 * math.cos(math.radians(a)) for a in (20, 25, 170, 180)]
HAND_LOSS = ((_d[0] - _d[1] + 0.2) + (_d[2] - _d[3] + 0.2)) / 2


def test_semihard_mining_selects_facenets_triplets_by_hand() -> None:
    from arcface.objectives import build_objective

    x, y = hand_example()
    objective = build_objective(objective_cfg("triplet/semihard"), NUM_CLASSES, 0, 1, torch.device("cpu"))
    loss = objective(x * 3.0, y)  # the objective normalises: the scale must not matter
    assert objective.last_triplets.tolist() == HAND_TRIPLETS
    assert loss.item() == pytest.approx(HAND_LOSS, rel=1e-12)
    # 2 triplets, both active, out of 6 anchor-positive pairs; 3 same-identity pairs in the batch
    assert objective.log_values() == pytest.approx({"positive_pairs": 3, "triplets": 2,
                                                    "active_triplets": 2 / 6})


# ------------------------------------------------------------------ one process vs the dense references

def _run_all(rank: int, world_size: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Everything one rank computes for the comparisons (batched: process spawn is slow)."""
    from arcface.objectives import build_objective

    cpu = torch.device("cpu")
    b = x.shape[0] // world_size
    mine = slice(rank * b, (rank + 1) * b)
    out: dict = {}
    for name in CASES:
        objective = build_objective(objective_cfg(name), NUM_CLASSES, rank, world_size, cpu)
        steps = []
        # margin: a second step draws from the advanced generator (still W-independent)
        for _step in range(2 if name == "margin" else 1):
            local = x[mine].clone().requires_grad_()
            loss = objective(local, y[mine])
            loss.backward()
            record = {"loss": loss.detach(), "grad": local.grad, "log": objective.log_values()}
            if getattr(objective, "last_triplets", None) is not None:
                record["triplets"] = objective.last_triplets.clone()
            if name == "margin":
                record["beta_grad"] = objective.beta.grad.clone()
                objective.beta.grad = None
            steps.append(record)
        out[name] = steps
        # A global batch with nothing to learn from (every identity once): 0, zero gradients, no NaN,
        # and no rank left waiting in a collective.
        objective = build_objective(objective_cfg(name), NUM_CLASSES, rank, world_size, cpu)
        local = x[mine].clone().requires_grad_()
        loss = objective(local, torch.arange(x.shape[0])[mine])
        loss.backward()
        out[name + "/unique"] = {"loss": loss.detach(), "grad": local.grad, "log": objective.log_values()}
    hx, hy = hand_example()
    hb = hx.shape[0] // world_size
    objective = build_objective(objective_cfg("triplet/semihard"), NUM_CLASSES, rank, world_size, cpu)
    out["hand"] = {"loss": objective(hx[rank * hb:(rank + 1) * hb], hy[rank * hb:(rank + 1) * hb]).detach(),
                   "triplets": objective.last_triplets}
    return out


# the identification part (sharded Partial FC) runs in fp32 by design: compared at fp32 precision
TOLERANCE = {"softmax+contrastive": 2e-5}


@pytest.fixture(scope="module")
def one_process() -> dict:
    x, y = make_batch(24, seed=5)
    return {"x": x, "y": y, "out": _run_all(0, 1, x, y)}


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_equals_the_dense_reference(one_process: dict, name: str) -> None:
    x, y = one_process["x"], one_process["y"]
    ours = one_process["out"][name][0]
    ref = dense_reference(name, x, y, ours.get("triplets"))
    tol = TOLERANCE.get(name, 1e-6)
    assert rel_err(ours["loss"], ref["loss"]) <= tol, (ours["loss"], ref["loss"])
    assert rel_err(ours["grad"], ref["grad"]) <= tol
    assert ours["log"]["positive_pairs"] == sum(c * (c - 1) // 2 for c in torch.bincount(y).tolist())
    if name == "margin":
        assert rel_err(ours["beta_grad"], ref["beta_grad"]) <= 1e-6
        assert ours["log"]["beta"] == pytest.approx(1.1)
    if name.startswith("triplet/semihard"):
        squared = not name.endswith("euclidean")
        dist = L.pairwise_distances(F.normalize(x), squared=squared)
        mined = L.mine_triplets(dist, y, margin=0.2 if squared else 0.3, mining="semihard")
        assert torch.equal(ours["triplets"], mined)
    # Every identity once: the triplet, lifted and margin losses have nothing to learn (exactly 0, zero
    # gradient); the contrastive one still pushes negatives apart and the softmax still classifies.
    unique = one_process["out"][name + "/unique"]
    distinct = torch.arange(x.shape[0])
    ref = dense_reference(name, x, distinct, torch.zeros(0, 3, dtype=torch.long))
    assert unique["log"]["positive_pairs"] == 0
    assert rel_err(unique["loss"], ref["loss"]) <= tol and rel_err(unique["grad"], ref["grad"]) <= tol
    if not name.endswith("contrastive"):
        assert unique["loss"].item() == 0.0 and torch.count_nonzero(unique["grad"]) == 0


def test_the_objectives_learn_something_from_the_test_batch(one_process: dict) -> None:
    """Guard against a vacuous comparison: every case has nonzero loss and gradient on the test batch."""
    for name in CASES:
        ours = one_process["out"][name][0]
        assert ours["loss"].item() > 0 and ours["grad"].abs().max() > 1e-3, name


@pytest.mark.parametrize("name", list(CASES))
def test_a_non_finite_embedding_makes_the_loss_non_finite(name: str) -> None:
    """Mining may leave a NaN row out of every term, but the gradient is NaN anyway: the loss must say so,
    so that the loop skips the update."""
    from arcface.objectives import build_objective

    x, y = make_batch(24, seed=5)
    x[3] = math.nan
    objective = build_objective(objective_cfg(name), NUM_CLASSES, 0, 1, torch.device("cpu"))
    assert not torch.isfinite(objective(x, y))


def test_distance_weighted_draws_follow_the_reference_probabilities() -> None:
    """Identity 0: 41 images at one point (1640 anchor-positive pairs with identical rows); 5 negatives at
    distances 0.6 .. 1.3. Three steps = 4920 draws from one distribution: the frequencies must match
    arcface.objectives.losses.distance_weights (std <= 0.0072 per frequency; bound 0.03)."""
    from arcface.objectives.pairwise import MarginObjective

    anchor = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    negatives = []
    for d in (0.6, 0.8, 1.0, 1.15, 1.3):  # unit vectors at Euclidean distance d from the anchor
        cos = 1 - d * d / 2
        negatives.append(torch.tensor([cos, math.sqrt(1 - cos * cos), 0.0, 0.0], dtype=torch.float64))
    x = torch.cat([anchor.expand(41, 4), torch.stack(negatives)])
    y = torch.cat([torch.zeros(41, dtype=torch.long), torch.arange(1, 6)])
    probabilities = L.distance_weights(L.pairwise_distances(x), y, 4)[0, 41:]
    assert probabilities.min() > 0.05  # a non-trivial distribution
    objective = MarginObjective(seed=3)
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(3):
        objective(x, y)
        drawn = objective.last_triplets
        assert (drawn[:, 0] < 41).all()  # negatives only have no positive: they are never anchors
        counts += torch.bincount(drawn[:, 2] - 41, minlength=5).double()
    assert counts.sum() == 3 * 41 * 40
    assert (counts / counts.sum() - probabilities).abs().max() < 0.03


def test_inverse_cdf_never_draws_a_zero_probability_column() -> None:
    from arcface.objectives.pairwise import sample_by_inverse_cdf

    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5, dtype=torch.float64)
    uniforms = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 - 1e-16], dtype=torch.float64)
    assert sample_by_inverse_cdf(probabilities, uniforms).tolist() == [1, 1, 3, 3, 3]


# ------------------------------------------------------------------ W = 2, 3 ranks on gloo

@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_one_process_on_the_global_batch(one_process: dict, world_size: int) -> None:
    x, y = one_process["x"], one_process["y"]
    single = one_process["out"]
    results = run_distributed(_run_all, world_size, (x, y), timeout_s=240)
    for name in CASES:
        tol = TOLERANCE.get(name, 1e-6)
        for step, ref in enumerate(single[name]):
            ranks = [r[name][step] for r in results]
            # the loss value is bit-identical on every rank, and equals the one-process one
            assert all(torch.equal(r["loss"], ranks[0]["loss"]) for r in ranks), name
            assert rel_err(ranks[0]["loss"], ref["loss"]) <= tol, (name, step)
            assert rel_err(torch.cat([r["grad"] for r in ranks]), ref["grad"]) <= tol, (name, step)
            assert ranks[0]["log"] == pytest.approx(ref["log"], rel=1e-9), name
            if "triplets" in ref:  # global mining: the same triplets, split by anchor
                assert torch.equal(torch.cat([r["triplets"] for r in ranks]), ref["triplets"]), (name, step)
            if name == "margin":  # beta is replicated: every rank gets the whole gradient
                for r in ranks:
                    assert rel_err(r["beta_grad"], ref["beta_grad"]) <= 1e-6
        unique = [r[name + "/unique"] for r in results]
        assert rel_err(unique[0]["loss"], single[name + "/unique"]["loss"]) <= tol
        assert rel_err(torch.cat([u["grad"] for u in unique]), single[name + "/unique"]["grad"]) <= tol
        assert all(u["log"]["positive_pairs"] == 0 for u in unique)
    assert torch.cat([r["hand"]["triplets"] for r in results]).tolist() == HAND_TRIPLETS
    for r in results:
        assert r["hand"]["loss"].item() == pytest.approx(HAND_LOSS, rel=1e-12)


# ------------------------------------------------------------------ config and checkpoint errors

@pytest.mark.parametrize("override,key", [
    ("loss.triplet_mining=hardest", "loss.triplet_mining"), ("loss.triplet_margin=0", "loss.triplet_margin"),
    ("loss.triplet_distance=cosine", "loss.triplet_distance"),
    ("loss.contrastive_margin=-1", "loss.contrastive_margin"), ("loss.joint_weight=0", "loss.joint_weight"),
    ("loss.lifted_margin=0", "loss.lifted_margin"), ("loss.margin_alpha=0", "loss.margin_alpha"),
    ("loss.margin_beta_init=2.5", "loss.margin_beta_init"),
    ("loss.margin_beta_lr=-0.1", "loss.margin_beta_lr"), ("loss.margin_nu=-1", "loss.margin_nu")])
def test_bad_settings_name_the_key(override: str, key: str) -> None:
    from arcface.config import load_config

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_margin_state_missing_or_corrupt_names_the_file(tmp_path: Path) -> None:
    from arcface.checkpoint import CheckpointError
    from arcface.objectives.pairwise import MARGIN_STATE_FILE, MarginObjective

    objective = MarginObjective()
    with pytest.raises(CheckpointError, match=MARGIN_STATE_FILE):
        objective.load(tmp_path, None)
    (tmp_path / MARGIN_STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=MARGIN_STATE_FILE):
        objective.load(tmp_path, None)


# ------------------------------------------------------------------ end to end through arcface.train

def train_cfg(out: Path, batch_size: int, kind: str, *extra: str):  # noqa: ANN201
    """Tiny synthetic run: 4 identities, so a global batch of 12 holds about 3 images of each."""
    from arcface.config import load_config

    overrides = {"triplet": ["loss.triplet_margin=0.5"], "contrastive": [], "lifted": [],
                 "margin": ["loss.margin_beta_lr=0.05"],
                 "softmax+contrastive": ["loss.margin=softmax", "loss.m2=0.0", "loss.scale=16"]}[kind]
    return load_config(None, [
        "data.synthetic=true", "data.synthetic_num_images=96", "data.num_classes=4", "data.num_workers=0",
        "backbone.embedding_size=16", f"loss.kind={kind}", *overrides,
        "optim.lr=0.2", "optim.base_batch_size=12", "optim.grad_clip=0",
        "schedule.total_steps=6", "schedule.warmup_steps=2",
        f"runtime.batch_size={batch_size}", "runtime.device=cpu", "runtime.log_every=1",
        "eval.every=0", f"output.dir={out}", "output.checkpoint_every=100", "output.tensorboard=false",
        *extra])


def objective_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The objective's files of a checkpoint, as flat tensors (beta, generator, FC rows)."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob("*.pt")):
        if path.name.startswith(("margin_objective", "fc_shard")):
            for key, value in torch.load(path, weights_only=True).items():
                if isinstance(value, torch.Tensor):
                    state[f"{path.name}:{key}"] = value
    return state


LOGGED = {"triplet": "active_triplets", "contrastive": "active_negatives", "lifted": "active_pairs",
          "margin": "beta", "softmax+contrastive": "verification"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(LOGGED))
def test_training_checkpoints_and_resumes_exactly(tmp_path: Path, kind: str) -> None:
    from arcface.train import train

    full = train(train_cfg(tmp_path / "full", 12, kind), backbone_factory=tiny_factory, quiet=True)
    assert full["step"] == 6 and all(math.isfinite(v) for v in full["losses"])
    assert max(full["losses"]) > 0
    first = train(train_cfg(tmp_path / "cut", 12, kind), max_steps=3, backbone_factory=tiny_factory,
                  quiet=True)
    assert first["checkpoint"].endswith("step_00000003")
    second = train(train_cfg(tmp_path / "cut", 12, kind), backbone_factory=tiny_factory, quiet=True)
    assert second["resumed_from"] == first["checkpoint"]
    assert first["losses"] + second["losses"] == full["losses"]
    a, b = Path(full["checkpoint"]), Path(second["checkpoint"])
    for key, value in backbone_state(a).items():
        assert torch.equal(backbone_state(b)[key], value), key
    state_a, state_b = objective_state(a), objective_state(b)
    if kind == "margin":
        assert "margin_objective.pt:beta" in state_a and state_a["margin_objective.pt:beta"].item() != 1.2
    if kind == "softmax+contrastive":
        assert any(key.startswith("fc_shard_00000-of-00001.pt") for key in state_a)
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(state_b[key], value), key
    log = (tmp_path / "full" / "train.log").read_text()
    assert f"{LOGGED[kind]} " in log and "positive_pairs" in log


def _w2_margin_half(rank: int, world_size: int, out: str) -> dict:
    from arcface.train import train

    summary = train(train_cfg(Path(out), 6, "margin"), max_steps=3, backbone_factory=tiny_factory, quiet=True)
    return {"losses": summary["losses"], "checkpoint": summary["checkpoint"]}


@pytest.mark.distributed
@pytest.mark.slow
def test_margin_trains_on_two_ranks_like_one_and_resumes_on_one(tmp_path: Path) -> None:
    """W = 2 x 6 images = W = 1 x 12 (TinyNet has no batch coupling), beta included; the W = 2 checkpoint
    resumes on W = 1 and continues like the uninterrupted one-process run."""
    from arcface.train import train

    reference = train(train_cfg(tmp_path / "w1", 12, "margin"), backbone_factory=tiny_factory, quiet=True)
    results = run_distributed(_w2_margin_half, 2, (str(tmp_path / "w2"),), timeout_s=240)
    ref_losses = torch.tensor(reference["losses"], dtype=torch.float64)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64), ref_losses[:3],
                                   rtol=1e-5, atol=1e-6)
    resumed = train(train_cfg(tmp_path / "w2", 12, "margin"), backbone_factory=tiny_factory, quiet=True)
    assert resumed["resumed_from"] == results[0]["checkpoint"]
    torch.testing.assert_close(torch.tensor(resumed["losses"], dtype=torch.float64), ref_losses[3:],
                               rtol=1e-5, atol=1e-6)
    # fp32 sums in another order over 6 updates: a few 1e-6 of drift
    beta = objective_state(Path(resumed["checkpoint"]))["margin_objective.pt:beta"]
    ref_beta = objective_state(Path(reference["checkpoint"]))["margin_objective.pt:beta"]
    torch.testing.assert_close(beta, ref_beta, rtol=1e-5, atol=1e-6)
    assert ref_beta.item() != pytest.approx(1.2, abs=1e-3)  # beta moved
