"""Identity-balanced P x K training data (arcface.data.DistributedPKSampler, data.sampler = "pk").

References: the dataset's own labels (every batch is checked identity by identity), the epoch's identity
permutation (resuming must continue it without repeating or skipping an identity), and an uninterrupted
training run (a stop/resume through arcface.train.train must reproduce its losses and weights).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from arcface.config import load_config
from arcface.data import DistributedPKSampler, ResumableDistributedSampler, build_train_loader
from recordio_tools.writer import FaceDatasetWriter
from tests.arcface.test_train_loop import backbone_state, global_fc, make_cfg, tiny_bn_factory

# 14 identities; with K = 4, identities 4, 5, 6 and 12 have fewer than K images (3, 2, 1, 2).
COUNTS = [6, 5, 4, 4, 3, 2, 1, 7, 4, 5, 4, 8, 2, 4]
LABELS = np.repeat(np.arange(len(COUNTS)), COUNTS)
SMALL = {4, 5, 6, 12}


@pytest.fixture(scope="module")
def pk_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RecordIO file of COUNTS images per identity, interleaved (dataset order is not label order)."""
    folder = tmp_path_factory.mktemp("pk_rec")
    rng = np.random.default_rng(0)
    writer = FaceDatasetWriter(folder / "train", layout="plain")
    order = rng.permutation(len(LABELS))
    for index in order:
        noise = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        ok, png = cv2.imencode(".png", cv2.GaussianBlur(noise, (0, 0), 1.0))
        assert ok
        writer.add(int(LABELS[index]), png.tobytes())
    writer.close()
    return folder / "train.rec"


def samplers(world_size: int, batch_size: int = 8, k: int = 4, small: str = "replace",
             labels: np.ndarray = LABELS, seed: int = 3) -> list[DistributedPKSampler]:
    return [DistributedPKSampler(labels, r, world_size, seed, batch_size, k, small)
            for r in range(world_size)]


def run_epoch(ranks: list[DistributedPKSampler]) -> list[list[np.ndarray]]:
    """Every step of the current epoch: each rank's indices (advancing all ranks together)."""
    steps = []
    iterators = [s.iter_batches() for s in ranks]
    for _ in range(ranks[0].remaining_batches()):
        steps.append([next(it)[1] for it in iterators])
        for s in ranks:
            s.advance(1)
    return steps


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_batch_is_p_identities_by_k_images_and_ranks_are_disjoint(world_size: int) -> None:
    ranks = samplers(world_size)
    p, k = 2, 4
    draws: dict[tuple[int, int], np.ndarray] = {}
    for epoch in (0, 1):
        steps = run_epoch(ranks)
        assert len(steps) == len(COUNTS) // (world_size * p) and all(s.epoch == epoch + 1 for s in ranks)
        seen: list[int] = []
        for step in steps:
            step_ids = []
            for indices in step:
                assert indices.shape == (p * k,)
                blocks = LABELS[indices].reshape(p, k)  # identity-major: K images of one identity together
                assert (blocks == blocks[:, :1]).all()
                ids = blocks[:, 0].tolist()
                assert len(set(ids)) == p
                for ident, block in zip(ids, indices.reshape(p, k)):
                    # without replacement whenever the identity has K images
                    if COUNTS[ident] >= k:
                        assert len(set(block.tolist())) == k
                    draws[(epoch, ident)] = np.sort(block)
                step_ids += ids
            assert len(set(step_ids)) == len(step_ids)  # ranks' identities are disjoint within a step
            seen += step_ids
        assert len(set(seen)) == len(seen)  # at most once per epoch
    # An identity's K images depend on (seed, epoch, identity) only, not on the world size or position.
    one = samplers(1)[0]
    for (epoch, ident), block in draws.items():
        position = int(np.flatnonzero(one.identities == ident)[0])
        assert np.array_equal(np.sort(one.draw(epoch, position)), block)


def test_small_identities_are_drawn_with_replacement_or_skipped_and_counted() -> None:
    replace, skip = samplers(1)[0], samplers(1, small="skip")[0]
    assert replace.num_small_identities == skip.num_small_identities == len(SMALL)
    assert replace.num_identities == 14 and skip.num_identities == 10
    assert replace.samples_per_epoch == 14 * 4 and skip.samples_per_epoch == 10 * 4
    assert "4 of them with fewer than 4 images (drawn with replacement)" in replace.describe()
    assert "4 of them with fewer than 4 images (skipped)" in skip.describe()
    assert not SMALL & set(skip.identities.tolist())
    seen_small = set()
    for _ in range(4):
        for step in run_epoch([skip]):
            assert not SMALL & set(LABELS[step[0]].tolist())
        for step in run_epoch([replace]):
            for block in step[0].reshape(2, 4):
                ident = int(LABELS[block[0]])
                if ident in SMALL:
                    seen_small.add(ident)
                    # every image of the identity is one of its own, repeated to make K
                    assert set(block.tolist()) <= set(np.flatnonzero(LABELS == ident).tolist())
    assert seen_small  # small identities do take part with replacement


def test_mid_epoch_resume_is_exact_and_continues_the_permutation_on_another_world_size() -> None:
    full = run_epoch(samplers(2))  # 3 steps of 4 identities (14 // 4), the last 2 identities dropped
    ranks = samplers(2)
    iterators = [s.iter_batches() for s in ranks]
    head = [[next(it)[1] for it in iterators]]
    for s in ranks:
        s.advance(1)
    state = ranks[0].state_dict()
    assert state["sampler"] == "pk" and state["consumed"] == 4 and state["epoch"] == 0
    resumed = samplers(2)
    for s in resumed:
        s.load_state_dict(state)
    tail = run_epoch(resumed)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # On 3 ranks x P = 1 (another world size and batch size): the same permutation from identity 4 on.
    order = samplers(1)[0].permutation(0)
    identities = samplers(1)[0].identities
    on_three = samplers(3, batch_size=4)
    for s in on_three:
        s.load_state_dict(state)
    continued = [int(LABELS[indices[0]]) for step in run_epoch(on_three) for indices in step]
    assert continued == identities[order[4:4 + 9]].tolist()  # 10 left: 3 steps of 3, 1 dropped
    assert all(s.epoch == 1 and s.consumed == 0 for s in on_three)


def test_sampler_state_mismatches_are_refused() -> None:
    pk_state = samplers(1)[0].state_dict()
    with pytest.raises(ValueError, match="saved with data.sampler = 'pk', this run uses data.sampler = "
                                         "'shuffle'"):
        ResumableDistributedSampler(len(LABELS), 0, 1, seed=3, batch_size=8).load_state_dict(pk_state)
    shuffle_state = ResumableDistributedSampler(len(LABELS), 0, 1, seed=3, batch_size=8).state_dict()
    with pytest.raises(ValueError, match="saved with data.sampler = 'shuffle', this run uses data.sampler = "
                                         "'pk'"):
        samplers(1)[0].load_state_dict(shuffle_state)
    with pytest.raises(ValueError, match="data.pk_images_per_identity or data.pk_small_identities changed"):
        samplers(1, small="skip")[0].load_state_dict(pk_state)
    with pytest.raises(ValueError, match="data.seed"):
        samplers(1, seed=4)[0].load_state_dict(pk_state)
    with pytest.raises(ValueError, match="14 identities, fewer than one step's world size 2 x P"):
        samplers(2, batch_size=32)
    with pytest.raises(ValueError, match=r"runtime.batch_size \(6\) must be a multiple of "
                                         r"data.pk_images_per_identity \(4\)"):
        load_config(None, ["data.sampler=pk", "runtime.batch_size=6"])
    with pytest.raises(ValueError, match="data.pk_small_identities must be one of 'replace', 'skip'"):
        load_config(None, ["data.pk_small_identities=drop"])


def test_loader_serves_the_sampled_images_and_repeats_get_their_own_augmentation(pk_rec: Path) -> None:
    cfg = load_config(None, [f"data.rec={pk_rec}", "data.num_workers=0", "runtime.batch_size=8",
                             "data.sampler=pk", "data.color_jitter=0.3", "data.flip=true"])
    loader = build_train_loader(cfg, rank=0, world_size=1, device="cpu")
    assert loader.num_images == len(LABELS) and loader.samples_per_epoch == 14 * 4
    assert loader.steps_per_epoch == 7 and "14 identities, 4 of them" in loader.describe()
    dataset = loader.dataset
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(batches) == 7 and loader.epoch == 1
    order = loader.sampler.permutation(0)
    for step, (_, labels) in enumerate(batches):
        expected = loader.sampler.identities[order[2 * step:2 * step + 2]]
        assert labels.tolist() == np.repeat(expected, 4).tolist()
    # identity 6 has one image: in its batch it appears 4 times, each with its own augmentation
    step = next(s for s, (_, labels) in enumerate(batches) if 6 in labels.tolist())
    images, labels = batches[step]
    copies = images[labels == 6]
    assert copies.shape[0] == 4
    assert all(not torch.equal(copies[i], copies[j]) for i in range(4) for j in range(i + 1, 4))
    index = int(np.flatnonzero(dataset.labels == 6)[0])
    assert torch.equal(copies[2], dataset[(0, index, 2)][0])


def test_training_with_pk_batches_stops_and_resumes_exactly(pk_rec: Path, tmp_path: Path) -> None:
    """Through arcface.train.train on the RecordIO file: 10 updates of 2 identities x 2 images (7 per
    epoch, so the run crosses an epoch), stopped after 4 and resumed, equal the uninterrupted run."""
    from arcface.train import train

    extra = ("data.synthetic=false", f"data.rec={pk_rec}", "data.num_classes=14", "data.sampler=pk",
             "data.pk_images_per_identity=2", "data.flip=true", "schedule.total_steps=10")
    full = train(make_cfg(tmp_path / "full", 4, *extra), backbone_factory=tiny_bn_factory)
    assert full["step"] == 10 and full["epoch"] == 1
    log = (tmp_path / "full" / "train.log").read_text()
    assert "sampler: P x K, 2 identities x 2 images per rank and batch" in log
    assert "14 identities, 1 of them with fewer than 2 images (drawn with replacement)" in log
    out = tmp_path / "cut"
    first = train(make_cfg(out, 4, *extra), max_steps=4, backbone_factory=tiny_bn_factory)
    second = train(make_cfg(out, 4, *extra), backbone_factory=tiny_bn_factory)
    assert second["resumed_from"] == first["checkpoint"]
    assert first["losses"] + second["losses"] == full["losses"]
    a, b = backbone_state(Path(full["checkpoint"])), backbone_state(Path(second["checkpoint"]))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert torch.equal(global_fc(Path(second["checkpoint"])), global_fc(Path(full["checkpoint"])))


def test_synthetic_data_takes_the_pk_sampler_too() -> None:
    """Synthetic labels are i % data.num_classes: the P x K loader serves identity-major batches of them."""
    cfg = load_config("cpu_synthetic", ["data.synthetic_num_images=60", "data.num_classes=12",
                                        "runtime.batch_size=6", "data.sampler=pk",
                                        "data.pk_images_per_identity=3"])
    loader = build_train_loader(cfg, 1, 2, "cpu")
    assert loader.samples_per_epoch == 12 * 3 and loader.batches_per_epoch == 3
    batches = [labels.clone() for _, labels in loader]
    order = loader.sampler.permutation(0)
    for step, labels in enumerate(batches):  # rank 1 takes the 2nd pair of each group of 4 identities
        assert labels.tolist() == np.repeat(loader.sampler.identities[order[4 * step + 2:4 * step + 4]],
                                            3).tolist()
