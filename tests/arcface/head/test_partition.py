"""ClassPartition: pure arithmetic, checked against brute force for many (C, W); no process group."""

from __future__ import annotations

import pytest
import torch

from arcface.head.partition import ClassPartition

CASES = [(c, w) for w in (1, 2, 3, 4, 5, 7, 8, 16) for c in (w, w + 1, 2 * w - 1, 10, 11, 97, 1000, 1001)
         if c >= w]


@pytest.mark.parametrize("num_classes,world_size", CASES)
def test_partition_covers_every_class_exactly_once(num_classes: int, world_size: int) -> None:
    parts = ClassPartition(num_classes, world_size, 0).all_ranks()
    owner_count = torch.zeros(num_classes, dtype=torch.long)
    sizes = []
    for rank, part in enumerate(parts):
        assert part.rank == rank
        owner_count[part.class_start:part.class_end] += 1
        sizes.append(part.num_local)
        # The documented closed form, independently of the implementation.
        assert part.num_local == num_classes // world_size + (rank < num_classes % world_size)
    assert bool((owner_count == 1).all())
    assert parts[0].class_start == 0 and parts[-1].class_end == num_classes
    for left, right in zip(parts, parts[1:]):
        assert left.class_end == right.class_start  # contiguous, in rank order
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert sizes == sorted(sizes, reverse=True)  # the first C % W ranks get the extra class


@pytest.mark.parametrize("num_classes,world_size", [(11, 3), (1000, 7), (16, 16), (5, 1)])
def test_label_maps_and_owner_against_brute_force(num_classes: int, world_size: int) -> None:
    labels = torch.arange(num_classes)
    brute_owner = torch.cat([torch.full((p.num_local,), r) for r, p in
                             enumerate(ClassPartition(num_classes, world_size, 0).all_ranks())])
    for part in ClassPartition(num_classes, world_size, 0).all_ranks():
        local = part.to_local(labels)
        owned = brute_owner == part.rank
        assert torch.equal(local[~owned], torch.full_like(local[~owned], -1))
        assert torch.equal(local[owned], torch.arange(part.num_local))
        assert torch.equal(part.to_global(local[owned]), labels[owned])
        assert torch.equal(part.to_global(torch.tensor([-1])), torch.tensor([-1]))
        assert torch.equal(part.owns(labels), owned)
        assert torch.equal(part.owner_of(labels), brute_owner)
        assert [part.owner_of(int(c)) for c in labels] == brute_owner.tolist()


def test_partition_is_a_frozen_value() -> None:
    part = ClassPartition(10, 3, 1)
    assert part == ClassPartition(10, 3, 1) and hash(part) == hash(ClassPartition(10, 3, 1))
    assert part.for_rank(2) == ClassPartition(10, 3, 2)
    with pytest.raises(AttributeError):
        part.rank = 0  # type: ignore[misc]


@pytest.mark.parametrize("args,match", [((10, 0, 0), "world_size"), ((10, 2, 2), "rank"),
                                        ((10, 2, -1), "rank"), ((2, 3, 0), "num_classes"),
                                        ((10.0, 2, 0), "num_classes")])
def test_partition_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        ClassPartition(*args)


def test_label_maps_reject_out_of_range() -> None:
    part = ClassPartition(10, 3, 1)  # owns [4, 7)
    with pytest.raises(ValueError, match="local labels"):
        part.to_global(torch.tensor([3]))
    with pytest.raises(ValueError, match="global label"):
        part.owner_of(10)
    with pytest.raises(ValueError, match="global labels"):
        part.owner_of(torch.tensor([0, -2]))
