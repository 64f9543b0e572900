"""A face dataset over one ``.rec`` or many shards: global image indices, labels, identity ranges.

:func:`open_dataset` accepts a ``.rec`` path, its prefix, a folder holding ``train.rec`` (or one
manifest), or a shard manifest JSON. Both layouts are read:

* **InsightFace**: key 0 is a header record (array label ``[first_identity_key, end_key]``, no data),
  keys ``1..N`` are images, the keys after them one identity record each with label ``[start, end)``;
* **plain** (``im2rec``): every record is an image; keys are list indices; labels scalar or arrays whose
  first value is the identity.

Image ``i`` of the dataset is the ``i``-th image record in key order, shards concatenated in manifest
order. Nothing is read eagerly except the index, the header/identity records, and (for the plain
layout) a 36-byte gather per record for the labels.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codec import IR_SIZE, IRHeader, unpack
from .errors import RecordIOError
from .reader import IndexedRecordReader, check_recordio_magic, idx_path_for
from .shards import MANIFEST_SUFFIX, Manifest, read_manifest, refuse_if_incomplete

_FLAG = struct.Struct("<I")
_SPOT_CHECKS = 64


@dataclass
class ShardLayout:
    """What one ``.rec`` holds: image keys in order, their labels, and identity ranges if recorded."""

    reader: IndexedRecordReader
    layout: str
    image_keys: np.ndarray
    image_offsets: np.ndarray
    labels: np.ndarray
    header_label: tuple[int, int] | None
    identity_ranges: np.ndarray | None  # (K, 2) local image indices, row j = local identity j
    class_start: int  # global class of local identity 0 (InsightFace layout)

    @property
    def name(self) -> str:
        return self.reader.rec_path.name


def _int_label(value: float, path: str, key: int, what: str = "label") -> int:
    if not np.isfinite(value) or value != int(value) or value < 0:
        raise RecordIOError(f"{what} {value!r} is not a non-negative integer", path, key)
    return int(value)


def read_header_record(reader: IndexedRecordReader) -> tuple[int, int] | None:
    """``(first_identity_key, end_key)`` when key 0 is an InsightFace header record, else ``None``.

    ``im2rec`` files can have an image with an array label at key 0 too; a header record is told apart
    by carrying no data after its two label floats and by a consistent key range.
    """
    if 0 not in reader:
        return None
    header, data = unpack(reader.read(0), f"{reader.rec_path} key 0")
    if header.flag < 2 or len(data) != 0:
        return None
    first, end = float(header.label[0]), float(header.label[1])
    if not (np.isfinite(first) and np.isfinite(end)) or first != int(first) or end != int(end):
        return None
    if not 1 <= first <= end:
        return None
    return int(first), int(end)


def load_shard(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> ShardLayout:
    """Open one ``.rec``/``.idx`` pair and work out its layout, image keys and labels."""
    reader = IndexedRecordReader(rec_path, idx_path)
    path = str(reader.rec_path)
    header_label = read_header_record(reader)
    sorted_keys = np.sort(reader.keys)
    if header_label is None:
        image_keys = sorted_keys
        labels_f = reader.gather_labels(image_keys)
        layout, ranges, class_start = "plain", None, 0
    else:
        first_identity, end_key = header_label
        image_keys = sorted_keys[(sorted_keys >= 1) & (sorted_keys < first_identity)]
        if len(image_keys) != first_identity - 1:
            missing = sorted(set(range(1, first_identity)) - set(image_keys.tolist()))[:5]
            raise RecordIOError(f"header record says images are keys 1..{first_identity - 1}, but keys "
                                f"{missing} are missing from the index", path, 0)
        ranges = _identity_ranges(reader, first_identity, end_key, image_keys)
        labels_f, ranges, class_start = _labels_from_ranges(reader, image_keys, ranges)
        layout = "insightface"
    labels = np.empty(len(labels_f), dtype=np.int64)
    bad = ~np.isfinite(labels_f) | (labels_f < 0) | (labels_f != np.floor(labels_f))
    if bad.any():
        index = int(np.argmax(bad))
        _int_label(float(labels_f[index]), path, int(image_keys[index]))
    labels[:] = labels_f
    offsets = np.array([reader.offset_of(int(key)) for key in image_keys], dtype=np.int64) \
        if len(image_keys) < 64 else _offsets_of(reader, image_keys)
    return ShardLayout(reader, layout, image_keys, offsets, labels, header_label, ranges, class_start)


def _offsets_of(reader: IndexedRecordReader, keys: np.ndarray) -> np.ndarray:
    positions = np.searchsorted(reader._sorted_keys, keys)
    return reader._sorted_offsets[positions]


def _identity_ranges(reader: IndexedRecordReader, first_identity: int, end_key: int,
                     image_keys: np.ndarray) -> np.ndarray:
    """Identity records as ``(K, 2)`` local image-index ranges (validated)."""
    path = str(reader.rec_path)
    ranges = np.zeros((end_key - first_identity, 2), dtype=np.int64)
    for row, key in enumerate(range(first_identity, end_key)):
        if key not in reader:
            raise RecordIOError(f"identity record missing (header record says identities are keys "
                                f"{first_identity}..{end_key - 1})", path, key)
        header, _ = unpack(reader.read(key), f"{path} key {key}")
        if header.flag < 2:
            raise RecordIOError(f"identity record must have an array label [start, end), got flag "
                                f"{header.flag}", path, key, reader.offset_of(key))
        start = _int_label(float(header.label[0]), path, key, "identity range start")
        end = _int_label(float(header.label[1]), path, key, "identity range end")
        if not 1 <= start <= end <= first_identity:
            raise RecordIOError(f"identity range [{start}, {end}) is outside the image keys "
                                f"1..{first_identity - 1}", path, key, reader.offset_of(key))
        ranges[row] = (start - 1, end - 1)  # keys 1..N are image indices 0..N-1
    return ranges


def _labels_from_ranges(reader: IndexedRecordReader, image_keys: np.ndarray,
                        ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Labels implied by identity ranges, confirmed against image headers at spread-out identities.

    Reading every image header of a multi-million-image file means touching most of its pages; the
    identity records give the same answer when the file is consistent, which the spot checks confirm.
    Any disagreement falls back to the image headers (what MXNet training code uses) and drops the ranges.
    """
    num_images = len(image_keys)
    order = np.argsort(ranges[:, 0], kind="stable")
    starts, ends = ranges[order, 0], ranges[order, 1]
    tiles = len(ranges) > 0 and starts[0] == 0 and ends[-1] == num_images and np.all(starts[1:] == ends[:-1])
    if tiles and np.all(np.diff(order) > 0):
        counts = ranges[:, 1] - ranges[:, 0]
        labels = np.repeat(np.arange(len(ranges), dtype=np.float64), counts)
        nonempty = np.flatnonzero(counts > 0)
        picks = nonempty[np.linspace(0, len(nonempty) - 1, min(_SPOT_CHECKS, len(nonempty))).astype(int)]
        sample = np.unique(np.concatenate([ranges[picks, 0], ranges[picks, 1] - 1]))
        stored = reader.gather_labels(image_keys[sample])
        class_start = stored[0] - labels[sample[0]]
        if np.array_equal(stored, labels[sample] + class_start) and class_start >= 0:
            return labels + class_start, ranges, int(class_start)
    warnings.warn(f"{reader.rec_path}: identity records disagree with image labels; using image labels "
                  f"and ignoring identity ranges (run `pack_rec verify` for details)", stacklevel=3)
    return reader.gather_labels(image_keys), None, 0


class FaceRecordDataset:
    """Images of one or more RecordIO shards under global indices ``0..len-1``.

    Picklable and fork-safe (each shard reader maps its file lazily per process).
    """

    def __init__(self, shards: list[ShardLayout], num_classes: int | None = None,
                 image_size: tuple[int, int] | None = None, source: str = "") -> None:
        if not shards:
            raise RecordIOError("a dataset needs at least one shard", source)
        self.shards = shards
        self.source = source
        self.layout = shards[0].layout if len({s.layout for s in shards}) == 1 else "mixed"
        sizes = np.array([len(shard.image_keys) for shard in shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = np.concatenate([shard.labels for shard in shards]).astype(np.int64)
        self._offsets = np.concatenate([shard.image_offsets for shard in shards]).astype(np.int64)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        max_label = int(self.labels.max()) if len(self.labels) else -1
        if num_classes is None:
            implied = [shard.class_start + len(shard.identity_ranges) for shard in shards
                       if shard.identity_ranges is not None]
            num_classes = max([max_label + 1, *implied])
        self.num_classes = int(num_classes)
        if max_label >= self.num_classes:
            index = int(np.argmax(self.labels >= self.num_classes))
            raise RecordIOError(f"label {self.labels[index]} out of range: the dataset has "
                                f"{self.num_classes} classes (labels 0..{self.num_classes - 1})",
                                str(self.shards[self.shard_of(index)].reader.rec_path), self.key_of(index)[1])
        self.identity_ranges = self._global_ranges()

    def _global_ranges(self) -> np.ndarray | None:
        if any(shard.identity_ranges is None for shard in self.shards):
            return None
        ranges = np.zeros((self.num_classes, 2), dtype=np.int64)
        seen = np.zeros(self.num_classes, dtype=bool)
        for shard, start in zip(self.shards, self.shard_starts[:-1].tolist()):
            classes = shard.class_start + np.arange(len(shard.identity_ranges))
            if np.any(classes >= self.num_classes) or np.any(seen[classes]):
                return None  # an identity split across shards: no single contiguous range
            seen[classes] = True
            ranges[classes] = shard.identity_ranges + start
        return ranges

    # -- sizes and labels ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def num_images(self) -> int:
        return len(self)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def label(self, index: int) -> int:
        """Identity label of image ``index``."""
        return int(self.labels[index])

    def shard_of(self, index: int) -> int:
        """Which shard holds image ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: image index {index} out of range 0..{len(self) - 1}")
        return int(np.searchsorted(self.shard_starts, index, side="right")) - 1

    def key_of(self, index: int) -> tuple[int, int]:
        """``(shard, record key)`` of image ``index``."""
        shard = self.shard_of(index)
        return shard, int(self.shards[shard].image_keys[index - self.shard_starts[shard]])

    def describe(self, index: int) -> str:
        """Human location of image ``index`` for error messages, e.g. ``train-00001-of-00004.rec key 17``."""
        shard, key = self.key_of(index)
        return f"{self.shards[shard].reader.rec_path} key {key}"

    # -- reading -------------------------------------------------------------------------------------
    def read_record(self, index: int) -> tuple[IRHeader, memoryview]:
        """``(IRHeader, image bytes)`` of image ``index``."""
        shard = self.shard_of(index)
        payload = self.shards[shard].reader.read_at(int(self._offsets[index]))
        return unpack(payload, self.describe(index))

    def read_image(self, index: int) -> memoryview | bytes:
        """The encoded image bytes of image ``index`` (a zero-copy view of the file when possible)."""
        if len(self.shards) == 1:
            if not 0 <= index < len(self._offsets):
                raise IndexError(f"{self.source}: image index {index} out of range 0..{len(self) - 1}")
            reader = self.shards[0].reader
        else:
            reader = self.shards[self.shard_of(index)].reader
        payload = reader.read_at(int(self._offsets[index]))
        if len(payload) < IR_SIZE:
            raise RecordIOError(f"{self.describe(index)}: record shorter than its 24-byte IRHeader")
        data_start = IR_SIZE + 4 * _FLAG.unpack_from(payload, 0)[0]
        if data_start > len(payload):
            raise RecordIOError(f"{self.describe(index)}: IRHeader announces more label floats than the "
                                f"record holds")
        return payload[data_start:]

    def __getitem__(self, index: int) -> tuple[memoryview | bytes, int]:
        """``(encoded image bytes, label)``."""
        return self.read_image(index), int(self.labels[index])

    def close(self) -> None:
        """Release every shard's memory map."""
        for shard in self.shards:
            shard.reader.close()

    def __repr__(self) -> str:
        return (f"FaceRecordDataset({self.source!r}, images={len(self)}, classes={self.num_classes}, "
                f"shards={len(self.shards)}, layout={self.layout})")


def read_property(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(num_classes, height, width)`` from an InsightFace ``property`` file in ``folder``, if present."""
    path = Path(folder) / "property"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        raise RecordIOError(f"expected 'num_classes,height,width', got {text[:60]!r}", str(path)) from None
    if len(values) != 3 or min(values) <= 0:
        raise RecordIOError(f"expected three positive integers 'num_classes,height,width', got {text[:60]!r}",
                            str(path))
    return values[0], values[1], values[2]


def resolve_dataset_path(path: str | os.PathLike) -> tuple[str, Path]:
    """``("manifest", json_path)`` or ``("rec", rec_path)`` for any accepted way to name a dataset.

    A pack that ``pack_rec pack`` has not finished (its journal is beside it) is refused whichever way it
    is named, with the command that finishes it: its finished shards alone are not the dataset.
    """
    path = Path(path)
    try:
        kind, resolved = _resolve(path)
    except RecordIOError:
        refuse_if_incomplete(path)  # "incomplete pack", rather than "not found", while one is being written
        raise
    refuse_if_incomplete(resolved)
    return kind, resolved


def _resolve(path: Path) -> tuple[str, Path]:
    text = str(path)
    if text.endswith(".json"):
        if not path.is_file():
            raise RecordIOError("manifest not found", text)
        return "manifest", path
    if path.suffix in (".rec", ".idx"):
        rec = path.with_suffix(".rec")
        if not rec.is_file():
            raise RecordIOError("record file not found", str(rec))
        return "rec", rec
    if path.is_dir():
        if (path / "train.rec").is_file():
            return "rec", path / "train.rec"
        manifests = sorted(path.glob("*" + MANIFEST_SUFFIX))
        if len(manifests) == 1:
            return "manifest", manifests[0]
        recs = sorted(path.glob("*.rec"))
        if len(recs) == 1:
            return "rec", recs[0]
        raise RecordIOError("folder holds no train.rec and no single manifest or .rec "
                            f"({len(manifests)} manifests, {len(recs)} .rec files)", text)
    manifest = path.with_name(path.name + MANIFEST_SUFFIX)
    if manifest.is_file():
        return "manifest", manifest
    rec = path.with_name(path.name + ".rec")
    if rec.is_file():
        return "rec", rec
    if path.is_file():
        check_recordio_magic(path)  # says "not a RecordIO file" for an image, a text file, ...
        raise RecordIOError("a RecordIO file without the .rec suffix: rename it to NAME.rec (its index "
                            "NAME.idx beside it) or name it by its .rec path", text)
    raise RecordIOError("no dataset here: expected a .rec file, its prefix, a folder holding train.rec, "
                        "or a shard manifest (.json)", text)


def open_manifest_shards(manifest_file: Path, manifest: Manifest) -> list[ShardLayout]:
    """Load every shard a manifest lists, checking the counts it records."""
    shards = []
    for info in manifest.shards:
        rec = manifest_file.parent / info.rec
        shard = load_shard(rec, manifest_file.parent / info.idx)
        if len(shard.reader) != info.num_records or len(shard.image_keys) != info.num_images:
            raise RecordIOError(f"shard holds {len(shard.reader)} records / {len(shard.image_keys)} images, "
                                f"the manifest says {info.num_records} / {info.num_images}", str(rec))
        shards.append(shard)
    return shards


def open_dataset(path: str | os.PathLike) -> FaceRecordDataset:
    """Open a face dataset from a ``.rec`` path, its prefix, a folder, or a shard manifest."""
    kind, resolved = resolve_dataset_path(path)
    if kind == "manifest":
        manifest = read_manifest(resolved)
        shards = open_manifest_shards(resolved, manifest)
        size = tuple(manifest.image_size) if manifest.image_size else None
        return FaceRecordDataset(shards, manifest.num_classes, size, str(resolved))
    shard = load_shard(resolved, idx_path_for(resolved))
    prop = read_property(resolved.parent)
    num_classes, size = (prop[0], (prop[1], prop[2])) if prop else (None, None)
    return FaceRecordDataset([shard], num_classes, size, str(resolved))
