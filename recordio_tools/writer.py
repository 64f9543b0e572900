"""Atomic RecordIO writers.

:class:`IndexedRecordWriter` writes ``<prefix>.rec`` and ``<prefix>.idx`` under temporary names
(``.rec.tmp`` / ``.idx.tmp``) and renames them into place only when closed cleanly, so an interrupted
write never leaves files that look complete. :meth:`IndexedRecordWriter.resume` reopens such temporary
files, drops a torn tail and continues.

:class:`FaceDatasetWriter` adds the face-dataset conventions on top: the InsightFace layout (images at
keys ``1..N``, one identity record per class, the header record at key 0) or the plain ``im2rec`` layout.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .codec import IRHeader, frame, pack, read_frame, unpack
from .errors import RecordIOError
from .reader import parse_index_bytes

TMP_SUFFIX = ".tmp"


class _KeySet:
    """Set of non-negative integer keys as a growable bitmap (42M keys fit in ~5 MB)."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._others: set[int] = set()

    def add(self, key: int) -> bool:
        """Add ``key``; return False if it was already present."""
        if not 0 <= key < 1 << 34:
            if key in self._others:
                return False
            self._others.add(key)
            return True
        byte, bit = divmod(key, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        if self._bits[byte] >> bit & 1:
            return False
        self._bits[byte] |= 1 << bit
        return True


class IndexedRecordWriter:
    """Write ``<prefix>.rec`` + ``<prefix>.idx`` atomically (temporary names until :meth:`close`).

    ``overwrite=False`` refuses to replace existing final files (nothing the user had is lost).
    Use as a context manager: an exception aborts (removes the temporary files) unless
    ``keep_partial=True``, which leaves them for :meth:`resume`.
    """

    def __init__(self, prefix: str | os.PathLike, overwrite: bool = False, keep_partial: bool = False,
                 _resume: bool = False) -> None:
        self.prefix = Path(prefix)
        self.rec_path = self.prefix.with_name(self.prefix.name + ".rec")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self.rec_tmp = self.rec_path.with_name(self.rec_path.name + TMP_SUFFIX)
        self.idx_tmp = self.idx_path.with_name(self.idx_path.name + TMP_SUFFIX)
        self.overwrite = overwrite
        self.keep_partial = keep_partial
        if not overwrite:
            for final in (self.rec_path, self.idx_path):
                if final.exists():
                    raise RecordIOError("already exists; refusing to overwrite (pass overwrite=True / "
                                        "--overwrite, or choose another output prefix)", str(final))
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self._sha256 = hashlib.sha256()
        self._keys = _KeySet()
        self.num_records = 0
        self.position = 0
        self.closed = False
        self.finished = False
        if not _resume:
            self._rec = open(self.rec_tmp, "wb")
            self._idx = open(self.idx_tmp, "w", encoding="ascii", newline="\n")

    # -- writing -------------------------------------------------------------------------------------
    def write(self, key: int, payload: bytes | bytearray | memoryview) -> int:
        """Append one record (its payload: ``IRHeader`` + data) under ``key``; return its byte offset."""
        if self.closed or self.finished:
            raise RecordIOError("writer is closed", str(self.rec_path))
        key = int(key)
        if not self._keys.add(key):
            raise RecordIOError(f"duplicate key {key}", str(self.rec_path), key)
        framed = frame(payload)
        offset = self.position
        self._rec.write(framed)
        self._sha256.update(framed)
        # The .idx line goes after its record: a crash can lose index lines, never point one at nothing
        # (resume re-validates anyway, since buffered writes may reach the disk in any order).
        self._idx.write(f"{key}\t{offset}\n")
        self.position += len(framed)
        self.num_records += 1
        return offset

    write_idx = write  # MXNet's name

    @property
    def sha256(self) -> str:
        """SHA-256 of the ``.rec`` bytes written so far."""
        return self._sha256.hexdigest()

    def flush(self) -> None:
        """Push buffered bytes to the OS (record file first)."""
        self._rec.flush()
        self._idx.flush()

    def close(self) -> tuple[Path, Path]:
        """Flush, fsync and rename both files into place; return ``(rec_path, idx_path)``."""
        self.finish()
        return self.commit()

    def finish(self) -> None:
        """Flush, fsync and close the temporary files, which are then complete but keep their names.

        Splitting :meth:`close` lets a caller record the finished file (e.g. in a journal) *before* it
        gets its final name, so that no interruption can leave a final-named file nobody recorded.
        """
        if self.finished:
            return
        self.flush()
        os.fsync(self._rec.fileno())
        os.fsync(self._idx.fileno())
        self._rec.close()
        self._idx.close()
        self.finished = True

    def commit(self) -> tuple[Path, Path]:
        """Rename the finished temporary files to their final names (``.rec`` first)."""
        if self.closed:
            return self.rec_path, self.idx_path
        if not self.finished:
            raise RecordIOError("commit() before finish()", str(self.rec_path))
        if not self.overwrite:
            for final in (self.rec_path, self.idx_path):
                if final.exists():
                    raise RecordIOError("appeared while writing; refusing to overwrite (the data is kept "
                                        f"in {self.rec_tmp.name} / {self.idx_tmp.name})", str(final))
        os.replace(self.rec_tmp, self.rec_path)
        os.replace(self.idx_tmp, self.idx_path)
        self.closed = True
        return self.rec_path, self.idx_path

    def abort(self) -> None:
        """Close and delete the temporary files (nothing final is touched)."""
        if self.closed:
            return
        for handle in (self._rec, self._idx):
            handle.close()  # a no-op when finish() closed it already
        for temporary in (self.rec_tmp, self.idx_tmp):
            if temporary.exists():
                temporary.unlink()
        self.closed = True

    def close_partial(self) -> None:
        """Flush and close the temporary files, keeping them for :meth:`resume`."""
        if self.closed:
            return
        # Each handle on its own (close() flushes it): an interruption inside finish() may have closed
        # one and not the other. Record file first, so an index line never precedes its record on disk.
        for handle in (self._rec, self._idx):
            handle.close()
        self.closed = True

    def __enter__(self) -> IndexedRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.keep_partial:
            self.close_partial()
        else:
            self.abort()

    # -- resume --------------------------------------------------------------------------------------
    @classmethod
    def resume(cls, prefix: str | os.PathLike, overwrite: bool = False, keep_partial: bool = True,
               accept: Callable[[int, int, memoryview], bool] | None = None,
               ) -> tuple[IndexedRecordWriter, list[tuple[int, int]]]:
        """Reopen the temporary files of an interrupted writer; return ``(writer, [(key, offset), ...])``.

        Keeps the longest prefix of index entries whose records are complete and laid end to end (and,
        with ``accept(number, key, payload)``, accepted: the first refused record ends the prefix),
        truncates the record file after the last of them (dropping a torn record) and rewrites the index
        to match. Missing temporary files mean a fresh start.
        """
        writer = cls(prefix, overwrite=overwrite, keep_partial=keep_partial, _resume=True)
        entries: list[tuple[int, int]] = []
        end = 0
        if writer.rec_tmp.exists() and writer.idx_tmp.exists():
            entries, end = _recover(writer.rec_tmp, writer.idx_tmp, accept)
        with open(writer.rec_tmp, "ab") as handle:  # create if missing
            handle.truncate(end)
        with open(writer.rec_tmp, "rb") as handle:
            while block := handle.read(1 << 22):
                writer._sha256.update(block)
        with open(writer.idx_tmp, "w", encoding="ascii", newline="\n") as handle:
            handle.writelines(f"{key}\t{offset}\n" for key, offset in entries)
        for key, _ in entries:
            writer._keys.add(key)
        writer.num_records = len(entries)
        writer.position = end
        writer._rec = open(writer.rec_tmp, "ab")
        writer._idx = open(writer.idx_tmp, "a", encoding="ascii", newline="\n")
        return writer, entries


def _recover(rec_tmp: Path, idx_tmp: Path, accept: Callable[[int, int, memoryview], bool] | None = None,
             ) -> tuple[list[tuple[int, int]], int]:
    """Longest valid (and accepted) prefix of ``(key, offset)`` index entries and the byte where it ends."""
    raw = idx_tmp.read_bytes()
    # A torn last line has no newline: drop it.
    complete = raw[: raw.rfind(b"\n") + 1] if b"\n" in raw else b""
    try:
        keys, offsets = parse_index_bytes(complete, idx_tmp) if complete.strip() else \
            (np.zeros(0, np.int64), np.zeros(0, np.int64))
    except RecordIOError:
        keys, offsets = np.zeros(0, np.int64), np.zeros(0, np.int64)
    data = rec_tmp.read_bytes()
    entries: list[tuple[int, int]] = []
    end = 0
    for key, offset in zip(keys.tolist(), offsets.tolist()):
        if offset != end:
            break
        try:
            payload, next_end = read_frame(data, offset, str(rec_tmp), key)
        except RecordIOError:
            break
        if accept is not None and not accept(len(entries), key, payload):
            break
        entries.append((key, offset))
        end = next_end
    return entries, end


class FaceDatasetWriter:
    """Write one face-dataset ``.rec``/``.idx`` in the InsightFace or the plain layout.

    InsightFace layout: images must arrive grouped by identity in class order within
    ``[class_start, class_start + num_classes)``; :meth:`close` appends one identity record per class
    (``[start_key, end_key)``, empty classes get an empty range) and the header record at key 0.
    Plain layout: images get keys ``0, 1, ...`` and scalar labels, in any order.
    Image records carry ``id = key`` and ``id2 = source_index`` (the item's position in the pack plan,
    which is what lets an interrupted pack resume exactly).
    """

    def __init__(self, prefix: str | os.PathLike, layout: str = "insightface", class_start: int = 0,
                 num_classes: int | None = None, overwrite: bool = False, keep_partial: bool = False,
                 _writer: IndexedRecordWriter | None = None) -> None:
        if layout not in ("insightface", "plain"):
            raise ValueError(f"layout must be 'insightface' or 'plain', got {layout!r}")
        if layout == "insightface" and num_classes is None:
            raise ValueError("the InsightFace layout needs num_classes (the classes this file holds)")
        self.layout = layout
        self.class_start = int(class_start)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.writer = _writer or IndexedRecordWriter(prefix, overwrite=overwrite, keep_partial=keep_partial)
        self.counts = np.zeros(self.num_classes or 0, dtype=np.int64)
        self.num_images = 0
        self.last_source_index = -1
        self._current = -1
        self.max_label = -1

    @property
    def next_key(self) -> int:
        return self.num_images + (1 if self.layout == "insightface" else 0)

    def add(self, label: int, image: bytes | memoryview, source_index: int = 0,
            extra_labels: list[float] | None = None) -> int:
        """Append an encoded image with identity ``label``; return its key."""
        label = int(label)
        key = self.next_key
        if self.layout == "insightface":
            local = label - self.class_start
            if not 0 <= local < self.num_classes:
                raise RecordIOError(f"label {label} outside this file's classes [{self.class_start}, "
                                    f"{self.class_start + self.num_classes})", str(self.writer.rec_path), key)
            if local < self._current:
                raise RecordIOError(f"images of identity {label} arrive after identity "
                                    f"{self._current + self.class_start}: the InsightFace layout needs each "
                                    f"identity's images contiguous and in class order",
                                    str(self.writer.rec_path), key)
            self._current = local
            self.counts[local] += 1
        header_label = float(label) if not extra_labels else np.array([label, *extra_labels], np.float32)
        self.writer.write(key, pack(IRHeader(0, header_label, key, int(source_index)), image))
        self.num_images += 1
        self.last_source_index = max(self.last_source_index, int(source_index))
        self.max_label = max(self.max_label, label)
        return key

    def identity_ranges(self) -> np.ndarray:
        """``(num_classes, 2)`` key ranges ``[start, end)`` of each class written so far."""
        ends = 1 + np.cumsum(self.counts)
        return np.stack([ends - self.counts, ends], axis=1)

    def close(self) -> tuple[Path, Path]:
        """Write identity + header records (InsightFace layout) and rename the files into place."""
        self.finish()
        return self.commit()

    def finish(self) -> None:
        """Write identity + header records (InsightFace layout), flush and fsync; the files keep their
        temporary names until :meth:`commit`."""
        if self.writer.finished or self.writer.closed:
            return
        if self.layout == "insightface":
            first_identity = self.num_images + 1
            for local, (start, end) in enumerate(self.identity_ranges().tolist()):
                key = first_identity + local
                self.writer.write(key, pack(IRHeader(2, np.array([start, end], np.float32), key, 0), b""))
            end_key = first_identity + self.num_classes
            header_label = np.array([first_identity, end_key], np.float32)
            # id2 = 1 as in the MXNet-written reference files, so our output matches them byte for byte.
            self.writer.write(0, pack(IRHeader(2, header_label, 0, 1), b""))
        self.writer.finish()

    def commit(self) -> tuple[Path, Path]:
        """Rename the finished files to their final names."""
        return self.writer.commit()

    def abort(self) -> None:
        """Delete the temporary files."""
        self.writer.abort()

    def close_partial(self) -> None:
        """Keep the temporary files for :meth:`resume`."""
        self.writer.close_partial()

    @classmethod
    def resume(cls, prefix: str | os.PathLike, layout: str = "insightface", class_start: int = 0,
               num_classes: int | None = None, overwrite: bool = False) -> FaceDatasetWriter:
        """Continue an interrupted file: recovers its complete image records and their bookkeeping.

        Identity and header records (written by :meth:`finish`, recognisable by their array label and
        empty data) mean the interruption came while or after the file was being finished: they are
        dropped with everything after them and written again, identically, by the next :meth:`finish`.
        """
        expected_first = 1 if layout == "insightface" else 0
        headers: list[IRHeader] = []

        def accept(number: int, key: int, payload: memoryview) -> bool:
            header, data = unpack(payload, f"{prefix}.rec{TMP_SUFFIX} key {key}")
            if layout == "insightface" and header.flag >= 2 and len(data) == 0:
                return False  # a closing record: the file was being finished
            if key != expected_first + number:
                raise RecordIOError("unexpected record in a partial shard (not the next image key); "
                                    "delete the .tmp files to start this shard again",
                                    f"{prefix}.rec{TMP_SUFFIX}", key)
            headers.append(header)
            return True

        writer, entries = IndexedRecordWriter.resume(prefix, overwrite=overwrite, keep_partial=True,
                                                     accept=accept)
        face = cls(prefix, layout, class_start, num_classes, overwrite, True, _writer=writer)
        for (key, offset), header in zip(entries, headers):
            label = int(header.label if header.flag == 0 else header.label[0])
            if layout == "insightface":
                local = label - face.class_start
                if not 0 <= local < (face.num_classes or 0) or local < face._current:
                    raise RecordIOError(f"label {label} does not belong at this place of the shard (classes "
                                        f"[{face.class_start}, {face.class_start + (face.num_classes or 0)}) "
                                        f"in order); delete the .tmp files to start this shard again",
                                        str(writer.rec_tmp), key, offset)
                face.counts[local] += 1
                face._current = local
            face.num_images += 1
            face.last_source_index = max(face.last_source_index, int(header.id2))
            face.max_label = max(face.max_label, label)
        return face
