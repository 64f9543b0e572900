"""Indexed RecordIO reader: ``.rec`` + ``.idx``, memory-mapped, random access by key, fork-safe.

The ``.rec`` file is opened lazily and re-opened when the process id changes, so a reader created in
the parent can be handed to DataLoader worker processes (fork or spawn: it pickles without its file
handles). Whole records come back as zero-copy views of the memory map.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .codec import (
    FRAME_HEADER,
    IR_HEADER,
    IR_SIZE,
    MAGIC,
    IRHeader,
    decode_lrecord,
    iter_frames,
    read_frame,
    unpack,
)
from .errors import RecordIOError

_FLOAT = struct.Struct("<f")


def idx_path_for(rec_path: str | os.PathLike) -> Path:
    """The ``.idx`` that belongs to a ``.rec`` (same name, other suffix)."""
    return Path(rec_path).with_suffix(".idx")


def parse_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse an MXNet ``.idx`` (``key<TAB>offset`` lines) into ``(keys, offsets)`` int64 arrays (file order).

    Bad lines raise :class:`RecordIOError` naming the file and line number; duplicate keys are refused.
    """
    idx_path = Path(idx_path)
    try:
        text = idx_path.read_bytes()
    except OSError as error:
        raise RecordIOError(f"cannot read index: {error.strerror or error}", str(idx_path)) from None
    return parse_index_bytes(text, idx_path)


def parse_index_bytes(text: bytes, idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """:func:`parse_index` of ``.idx`` content already in memory (``idx_path`` names it in errors)."""
    idx_path = Path(idx_path)
    tokens = text.split()
    try:
        # Fast path: one vectorised conversion for millions of lines.
        if len(tokens) % 2:
            raise ValueError("odd token count")
        values = np.array(tokens, dtype=np.bytes_).astype(np.int64).reshape(-1, 2)
        # MXNet separates key and offset with one TAB: a count mismatch means a malformed line.
        if text.count(b"\t") != len(values):
            raise ValueError("line/column mismatch")
    except ValueError:
        _raise_bad_index_line(idx_path, text)
        raise  # unreachable: _raise_bad_index_line always raises
    keys, offsets = values[:, 0].copy(), values[:, 1].copy()
    if len(offsets) and offsets.min() < 0:
        line = int(np.argmax(offsets < 0)) + 1
        raise RecordIOError(f"line {line}: negative offset {offsets[line - 1]}", str(idx_path))
    unique_keys, counts = np.unique(keys, return_counts=True)
    if len(unique_keys) != len(keys):
        duplicate = int(unique_keys[np.argmax(counts > 1)])
        raise RecordIOError(f"key {duplicate} appears {counts.max()} times in the index", str(idx_path))
    return keys, offsets


def _raise_bad_index_line(idx_path: Path, text: bytes) -> None:
    for number, line in enumerate(text.split(b"\n"), start=1):
        if not line.strip():
            continue
        fields = line.rstrip(b"\r").split(b"\t")
        if len(fields) != 2:
            raise RecordIOError(f"line {number}: expected 'key<TAB>offset', got {line[:60]!r}", str(idx_path))
        try:
            int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(f"line {number}: key and offset must be integers, got {line[:60]!r}",
                                str(idx_path)) from None
    raise RecordIOError("malformed index (blank lines inside or bad structure)", str(idx_path))


def check_recordio_magic(path: str | os.PathLike) -> None:
    """Raise :class:`RecordIOError` unless the file starts like RecordIO (the magic word at offset 0).

    Run before anything that would otherwise blame a missing or damaged index for a file that is not
    RecordIO at all (an image, a ``.bin`` pack, a text file). An empty file passes (it holds no record).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise RecordIOError(f"cannot read record file: {error.strerror or error}", str(path)) from None
    expected = FRAME_HEADER.pack(MAGIC, 0)[:4]
    if head and head != expected:
        found = " ".join(f"{byte:02x}" for byte in head)
        raise RecordIOError(f"not a RecordIO file: bad magic at offset 0 (found bytes {found}, expected "
                            f"{' '.join(f'{byte:02x}' for byte in expected)}, i.e. 0x{MAGIC:08X})", str(path))


class IndexedRecordReader:
    """Random access to the records of one ``.rec`` by the keys of its ``.idx``.

    ``keys`` / ``offsets`` are in ``.idx`` line order. ``read(key)`` returns the record payload
    (``IRHeader`` + data; a memoryview for whole records). Iterating yields ``(key, payload)`` in file
    order.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else idx_path_for(self.rec_path)
        if not self.rec_path.is_file():
            raise RecordIOError("record file not found (or not a file)", str(self.rec_path))
        check_recordio_magic(self.rec_path)
        if not self.idx_path.is_file():
            raise RecordIOError(f"index file not found; rebuild it with `pack_rec reindex {self.rec_path}`",
                                str(self.idx_path))
        self.keys, self.offsets = parse_index(self.idx_path)
        self.file_size = self.rec_path.stat().st_size
        past_end = np.flatnonzero(self.offsets + 8 > self.file_size)
        if len(past_end):
            bad = int(past_end[0])
            raise RecordIOError(f"index points past the end of the record file ({self.file_size} bytes); "
                                f"{len(past_end)} such entries in {self.idx_path.name}",
                                str(self.rec_path), int(self.keys[bad]), int(self.offsets[bad]))
        order = np.argsort(self.keys, kind="stable")
        self._sorted_keys = self.keys[order]
        self._sorted_offsets = self.offsets[order]
        self._mmap: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._pid = -1

    # -- lazy, per-process file handle --------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mmap"] = None
        state["_view"] = None
        state["_pid"] = -1
        return state

    def _buffer(self) -> memoryview:
        if self._pid != os.getpid() or self._view is None:
            # After fork the parent's map is shared memory we must not rely on (and a spawned worker has
            # none): open our own.
            with open(self.rec_path, "rb") as handle:
                if self.file_size == 0:
                    raise RecordIOError("record file is empty", str(self.rec_path))
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if len(self._mmap) != self.file_size:
                raise RecordIOError(f"record file changed size while open ({self.file_size} -> "
                                    f"{len(self._mmap)} bytes)", str(self.rec_path))
            self._view = memoryview(self._mmap)
            self._pid = os.getpid()
        return self._view

    def close(self) -> None:
        """Drop the memory map (views handed out earlier keep it alive until they are released)."""
        self._view = None
        self._mmap = None
        self._pid = -1

    # -- access -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        position = np.searchsorted(self._sorted_keys, key)
        return bool(position < len(self._sorted_keys) and self._sorted_keys[position] == key)

    def offset_of(self, key: int) -> int:
        """Byte offset of record ``key`` (KeyError naming the file when absent)."""
        position = int(np.searchsorted(self._sorted_keys, key))
        if position >= len(self._sorted_keys) or self._sorted_keys[position] != key:
            raise KeyError(f"{self.rec_path}: no record with key {key} in {self.idx_path.name}")
        return int(self._sorted_offsets[position])

    def read_at(self, offset: int, key: int | None = None) -> memoryview | bytes:
        """The record payload starting at byte ``offset``."""
        payload, _ = read_frame(self._buffer(), offset, str(self.rec_path), key)
        return payload

    def read(self, key: int) -> memoryview | bytes:
        """The record payload (``IRHeader`` + data) of ``key``."""
        return self.read_at(self.offset_of(key), key)

    def read_idx(self, key: int) -> memoryview | bytes:
        """Alias of :meth:`read` (MXNet's name)."""
        return self.read(key)

    def header(self, key: int) -> IRHeader:
        """The ``IRHeader`` of record ``key``."""
        header, _ = unpack(self.read(key), f"{self.rec_path} key {key}")
        return header

    def __iter__(self) -> Iterator[tuple[int, memoryview | bytes]]:
        """``(key, payload)`` in file (offset) order."""
        order = np.argsort(self.offsets, kind="stable")
        for position in order:
            key = int(self.keys[position])
            yield key, self.read_at(int(self.offsets[position]), key)

    def gather_labels(self, keys: np.ndarray) -> np.ndarray:
        """First label value of each record in ``keys`` (scalar label or ``label[0]``), vectorised.

        Reads 36 bytes per record (frame header, IRHeader, first label float) straight from the map,
        which is what makes opening a multi-million-image plain-layout file take seconds.
        """
        keys = np.asarray(keys, dtype=np.int64)
        positions = np.searchsorted(self._sorted_keys, keys)
        offsets = self._sorted_offsets[np.minimum(positions, len(self._sorted_keys) - 1)]
        labels = np.empty(len(keys), dtype=np.float64)
        if len(keys) == 0:
            return labels
        raw = np.frombuffer(self._buffer(), dtype=np.uint8)
        fast = offsets + 36 <= self.file_size
        fast_offsets = offsets[fast]
        gathered = raw[fast_offsets[:, None] + np.arange(36)]
        words = gathered[:, :12].copy().view("<u4")  # magic, lrecord, flag
        magic, lrecord, flag = words[:, 0], words[:, 1], words[:, 2]
        cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        scalar = gathered[:, 12:16].copy().view("<f4")[:, 0]
        first = gathered[:, 32:36].copy().view("<f4")[:, 0]
        simple = (magic == MAGIC) & ((cflag == 0) | (cflag == 1)) & (length >= 28)
        fast_labels = np.where(flag == 0, scalar, first).astype(np.float64)
        fast_indices = np.flatnonzero(fast)
        labels[fast_indices[simple]] = fast_labels[simple]
        # Anything unusual (short record, odd framing, bad magic) goes through the full parser, which
        # raises the precise error.
        slow = np.concatenate([np.flatnonzero(~fast), fast_indices[~simple]])
        for index in slow.tolist():
            key = int(keys[index])
            header, _ = unpack(self.read_at(int(offsets[index]), key), f"{self.rec_path} key {key}")
            labels[index] = float(header.label) if header.flag == 0 else float(header.label[0])
        return labels


def scan_records(rec_path: str | os.PathLike,
                 strict: bool = False) -> Iterator[tuple[int, memoryview | bytes]]:
    """``(offset, payload)`` for every record of a ``.rec`` in file order, without an index."""
    rec_path = Path(rec_path)
    if rec_path.stat().st_size == 0:
        return
    with open(rec_path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    for offset, payload, _ in iter_frames(memoryview(mapped), str(rec_path), strict=strict):
        yield offset, payload


def next_magic(buffer: bytes | mmap.mmap, start: int) -> int:
    """Offset of the next 4-byte-aligned frame header at or after ``start`` (``-1`` if none).

    Used to resynchronise after a damaged record: valid writers never leave the magic word at an
    aligned offset inside a payload.
    """
    position = (start + 3) & ~3
    magic = FRAME_HEADER.pack(MAGIC, 0)[:4]
    while True:
        found = buffer.find(magic, position)
        if found < 0:
            return -1
        if found % 4 == 0:
            return found
        position = (found + 3) & ~3


__all__ = ["IR_HEADER", "IR_SIZE", "IndexedRecordReader", "check_recordio_magic", "decode_lrecord",
           "idx_path_for", "next_magic", "parse_index", "parse_index_bytes", "scan_records"]
