"""MXNet RecordIO codec: record framing, ``IRHeader`` packing and image helpers.

Byte layout (little-endian, see docs/recordio.md):

* a frame is ``uint32 MAGIC``, ``uint32 lrecord = cflag << 29 | length``, ``length`` payload bytes, then
  zero padding to a multiple of 4;
* a payload that contains ``MAGIC`` at a 4-byte-aligned offset is written as several frames (cflag 1
  first, 2 middle, 3 last) with that magic word left out; readers put it back between the parts. This
  is what makes a reader that simply searches for the next magic word safe to resynchronise;
* a record payload is the 24-byte ``IRHeader`` (``IfQQ``), then ``flag`` float32 labels when the label
  is an array, then the data (an encoded image).
"""

from __future__ import annotations

import numbers
import struct
from typing import NamedTuple

import cv2
import numpy as np

from .errors import ImageError, RecordIOError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FRAME_HEADER = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
IR_FORMAT = "<IfQQ"
IR_SIZE = IR_HEADER.size  # 24
LENGTH_BITS = 29
MAX_PART_LENGTH = (1 << LENGTH_BITS) - 1
CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3

BytesLike = bytes | bytearray | memoryview


class IRHeader(NamedTuple):
    """The image-record header. ``label`` is a float (``flag == 0``) or a float32 array (``flag == len``)."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


# ----------------------------------------------------------------------------------------------- framing
def encode_lrecord(cflag: int, length: int) -> int:
    """The ``lrecord`` word: continuation flag in the top 3 bits, part length in the low 29."""
    if not 0 <= cflag <= 3:
        raise ValueError(f"cflag must be 0..3, got {cflag}")
    if not 0 <= length <= MAX_PART_LENGTH:
        raise ValueError(f"record part length {length} does not fit in 29 bits (max {MAX_PART_LENGTH})")
    return (cflag << LENGTH_BITS) | length


def decode_lrecord(lrecord: int) -> tuple[int, int]:
    """``(cflag, length)`` of an ``lrecord`` word."""
    return lrecord >> LENGTH_BITS, lrecord & MAX_PART_LENGTH


def padded(length: int) -> int:
    """``length`` rounded up to the 4-byte frame alignment."""
    return (length + 3) & ~3


def aligned_magic_offsets(payload: BytesLike) -> np.ndarray:
    """Offsets (multiples of 4) where ``payload`` holds the magic word; these force a multi-part record."""
    usable = len(payload) & ~3
    if usable == 0:
        return np.zeros(0, dtype=np.int64)
    # Compare whole little-endian words: one vectorised pass instead of a Python loop per 4 bytes.
    words = np.frombuffer(payload, dtype="<u4", count=usable // 4)
    return np.flatnonzero(words == MAGIC).astype(np.int64) * 4


def frame(payload: BytesLike) -> bytes:
    """Frame one record payload exactly as MXNet's writer does (splitting at aligned magic words)."""
    view = memoryview(payload).cast("B")
    splits = aligned_magic_offsets(view)
    parts: list[bytes | memoryview] = []
    start = 0
    for index, split in enumerate(splits.tolist()):
        cflag = CFLAG_FIRST if index == 0 else CFLAG_MIDDLE
        # Aligned split points make every non-final part a multiple of 4 long: no padding needed.
        parts.append(FRAME_HEADER.pack(MAGIC, encode_lrecord(cflag, split - start)))
        parts.append(view[start:split])
        start = split + 4
    last_flag = CFLAG_LAST if len(splits) else CFLAG_WHOLE
    tail = len(view) - start
    parts.append(FRAME_HEADER.pack(MAGIC, encode_lrecord(last_flag, tail)))
    parts.append(view[start:])
    parts.append(b"\0" * (padded(tail) - tail))
    return b"".join(parts)


def read_frame(buffer: BytesLike, offset: int, path: str | None = None, key: int | None = None,
               strict: bool = False) -> tuple[memoryview | bytes, int]:
    """Read the record starting at ``offset`` of ``buffer``; return ``(payload, end_offset)``.

    A whole record (one frame) comes back as a zero-copy ``memoryview`` of ``buffer``; a multi-part
    record is joined (the only case that must copy). ``strict`` also checks that padding bytes are zero.
    Raises :class:`RecordIOError` naming ``path``, ``key`` and the byte offset of the bad frame.
    """
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    size = len(view)
    parts: list[memoryview] = []
    position = offset
    expect_continuation = False
    while True:
        if position + 8 > size:
            raise RecordIOError(
                f"truncated record: frame header needs 8 bytes, file has {max(size - position, 0)} left",
                path, key, position)
        magic, lrecord = FRAME_HEADER.unpack_from(view, position)
        if magic != MAGIC:
            raise RecordIOError(f"wrong magic 0x{magic:08X} (expected 0x{MAGIC:08X}); not a record start",
                                path, key, position)
        cflag, length = decode_lrecord(lrecord)
        start = position + 8
        end = start + length
        if end > size:
            raise RecordIOError(f"truncated record: frame says {length} payload bytes, file has "
                                f"{size - start} left", path, key, position)
        if expect_continuation and cflag not in (CFLAG_MIDDLE, CFLAG_LAST):
            raise RecordIOError(f"multi-part record interrupted: expected a continuation frame "
                                f"(cflag 2 or 3), found cflag {cflag}", path, key, position)
        if not expect_continuation and cflag not in (CFLAG_WHOLE, CFLAG_FIRST):
            raise RecordIOError(f"continuation frame (cflag {cflag}) where a record should start",
                                path, key, position)
        next_position = start + padded(length)
        if next_position > size:
            raise RecordIOError("truncated record: padding after the payload is missing", path, key, end)
        if strict and any(view[end:next_position]):
            raise RecordIOError("non-zero padding bytes after the payload", path, key, end)
        parts.append(view[start:end])
        if cflag == CFLAG_WHOLE:
            return parts[0], next_position
        if cflag == CFLAG_LAST:
            return MAGIC_BYTES.join(parts), next_position
        if length % 4:
            raise RecordIOError(f"multi-part record: part of {length} bytes is not 4-byte aligned",
                                path, key, position)
        expect_continuation = True
        position = next_position


def iter_frames(buffer: BytesLike, path: str | None = None, strict: bool = False):
    """Yield ``(offset, payload, end_offset)`` for every record of a whole ``.rec`` buffer, in file order."""
    position = 0
    size = len(buffer)
    while position < size:
        payload, end = read_frame(buffer, position, path, strict=strict)
        yield position, payload, end
        position = end


# ----------------------------------------------------------------------------------------------- IRHeader
def pack(header: IRHeader | tuple, payload: BytesLike) -> bytes:
    """Record payload for ``header`` + ``payload`` (MXNet ``recordio.pack`` semantics).

    A scalar label is stored in the header with ``flag = 0``; an array label sets ``flag`` to its length,
    the header label to 0, and is prepended to ``payload`` as float32.
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        prefix = IR_HEADER.pack(0, float(header.label), int(header.id), int(header.id2))
        return prefix + bytes(payload)
    label = np.asarray(header.label, dtype="<f4").ravel()
    prefix = IR_HEADER.pack(label.size, 0.0, int(header.id), int(header.id2))
    return prefix + label.tobytes() + bytes(payload)


def unpack(record: BytesLike, source: str = "<record>") -> tuple[IRHeader, memoryview]:
    """Split a record payload into its ``IRHeader`` and data (a zero-copy view of ``record``).

    Array labels are returned as a float32 copy (so they do not pin a memory map).
    """
    view = record if isinstance(record, memoryview) else memoryview(record)
    if len(view) < IR_SIZE:
        raise RecordIOError(f"{source}: record of {len(view)} bytes is shorter than the 24-byte IRHeader")
    flag, label, record_id, record_id2 = IR_HEADER.unpack_from(view, 0)
    if flag == 0:
        return IRHeader(0, label, record_id, record_id2), view[IR_SIZE:]
    data_start = IR_SIZE + 4 * flag
    if data_start > len(view):
        raise RecordIOError(f"{source}: IRHeader flag {flag} announces {flag} label floats but the "
                            f"record has only {len(view) - IR_SIZE} bytes after the header")
    labels = np.frombuffer(view, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, labels, record_id, record_id2), view[data_start:]


def label_of(header: IRHeader) -> float:
    """The identity label of an image record: the scalar label, or the first value of an array label."""
    if header.flag == 0:
        return float(header.label)
    return float(header.label[0])


# ----------------------------------------------------------------------------------------------- images
def encode_image(img_bgr: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode a BGR (or grayscale) ``uint8`` image with OpenCV (``.jpg`` with ``quality``, or ``.png``)."""
    fmt = img_fmt.lower()
    if fmt in (".jpg", ".jpeg"):
        params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    elif fmt == ".png":
        params = [int(cv2.IMWRITE_PNG_COMPRESSION), 3]
    else:
        raise ValueError(f"img_fmt must be .jpg or .png, got {img_fmt!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    ok, encoded = cv2.imencode(fmt, img_bgr, params)
    if not ok:
        raise ImageError(f"OpenCV could not encode an image of shape {getattr(img_bgr, 'shape', None)}")
    return encoded.tobytes()


def decode_image(data: BytesLike | np.ndarray, source: str = "<bytes>",
                 flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """Decode encoded image bytes to a BGR ``uint8`` array; :class:`ImageError` names ``source``."""
    buffer = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageError(f"{source}: empty image data")
    image = cv2.imdecode(buffer, flags)
    if image is None:
        raise ImageError(f"{source}: image data does not decode ({buffer.size} bytes, starts "
                         f"{bytes(buffer[:4]).hex()})")
    return image


def pack_img(header: IRHeader | tuple, img_bgr: np.ndarray, quality: int = 95,
             img_fmt: str = ".jpg") -> bytes:
    """Encode ``img_bgr`` and pack it with ``header`` (MXNet ``recordio.pack_img``)."""
    return pack(header, encode_image(img_bgr, quality, img_fmt))


def unpack_img(record: BytesLike, source: str = "<record>",
               flags: int = cv2.IMREAD_COLOR) -> tuple[IRHeader, np.ndarray]:
    """Unpack a record and decode its image to BGR (MXNet ``recordio.unpack_img``)."""
    header, data = unpack(record, source)
    return header, decode_image(data, source, flags)
