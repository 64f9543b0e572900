"""RecordIO codec against golden bytes written out by hand from the format definition, plus round trips."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recordio_tools import codec
from recordio_tools.codec import MAGIC, IRHeader, frame, iter_frames, pack, read_frame, unpack
from recordio_tools.errors import RecordIOError

MAGIC_LE = b"\x0a\x23\xd7\xce"


def test_magic_bytes_little_endian():
    assert codec.MAGIC_BYTES == MAGIC_LE
    assert MAGIC == 0xCED7230A


def test_scalar_header_golden_bytes():
    # IfQQ: flag=0, label=3.0 (0x40400000), id=7, id2=9, then the data.
    expected = (b"\x00\x00\x00\x00" + b"\x00\x00\x40\x40" + b"\x07" + b"\x00" * 7 + b"\x09" + b"\x00" * 7
                + b"DATA")
    assert pack(IRHeader(0, 3.0, 7, 9), b"DATA") == expected
    header, data = unpack(expected)
    assert header == IRHeader(0, 3.0, 7, 9) and bytes(data) == b"DATA"


def test_array_label_header_golden_bytes():
    # flag = 2 labels, header label 0, then float32 1.0 (0x3f800000), 2.5 (0x40200000), then data.
    expected = (b"\x02\x00\x00\x00" + b"\x00" * 4 + b"\x05" + b"\x00" * 7 + b"\x00" * 8
                + b"\x00\x00\x80\x3f" + b"\x00\x00\x20\x40" + b"xy")
    assert pack(IRHeader(0, np.array([1.0, 2.5]), 5, 0), b"xy") == expected
    header, data = unpack(expected)
    assert header.flag == 2 and header.label.tolist() == [1.0, 2.5] and bytes(data) == b"xy"


def test_single_frame_golden_bytes_with_padding():
    # 5 payload bytes: magic, lrecord = 5 (cflag 0), payload, 3 zero bytes of padding.
    assert frame(b"hello") == MAGIC_LE + b"\x05\x00\x00\x00" + b"hello" + b"\x00\x00\x00"
    # 8 bytes: already aligned, no padding.
    assert frame(b"12345678") == MAGIC_LE + b"\x08\x00\x00\x00" + b"12345678"
    assert frame(b"") == MAGIC_LE + b"\x00\x00\x00\x00"


def test_multipart_golden_bytes():
    # The magic word at aligned offset 4 splits the record: part 1 = "abcd" with cflag 1
    # (lrecord = 1<<29 | 4 = 0x20000004), the magic is dropped, last part "xyz" with cflag 3
    # (0x60000003) plus one padding byte.
    payload = b"abcd" + MAGIC_LE + b"xyz"
    expected = (MAGIC_LE + b"\x04\x00\x00\x20" + b"abcd"
                + MAGIC_LE + b"\x03\x00\x00\x60" + b"xyz\x00")
    assert frame(payload) == expected
    joined, end = read_frame(expected, 0)
    assert bytes(joined) == payload and end == len(expected)


def test_multipart_three_parts_and_leading_magic():
    # Magic at offset 0 and 8: an empty first part (cflag 1), a middle part (cflag 2), a last part (cflag 3).
    payload = MAGIC_LE + b"ABCD" + MAGIC_LE + b"Z"
    framed = frame(payload)
    words = struct.unpack_from("<II", framed, 0)
    assert words == (MAGIC, (1 << 29) | 0)
    assert struct.unpack_from("<II", framed, 8) == (MAGIC, (2 << 29) | 4)
    assert struct.unpack_from("<II", framed, 20) == (MAGIC, (3 << 29) | 1)
    assert bytes(read_frame(framed, 0)[0]) == payload


def test_unaligned_magic_is_not_split():
    payload = b"ab" + MAGIC_LE + b"cd"
    framed = frame(payload)
    assert struct.unpack_from("<II", framed, 0) == (MAGIC, len(payload))
    assert bytes(read_frame(framed, 0)[0]) == payload


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=13), st.just(MAGIC_LE)), max_size=8), st.integers(0, 3))
def test_round_trip_arbitrary_payloads(pieces, shift):
    # Random payloads with the magic word at aligned and unaligned offsets, several records in a row.
    payload = b"\x01" * shift + b"".join(pieces)
    stream = frame(payload) + frame(payload[::-1]) + frame(b"")
    records = [bytes(p) for _, p, _ in iter_frames(stream)]
    assert records == [payload, payload[::-1], b""]
    assert len(stream) % 4 == 0


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(-1e6, 1e6, width=32), st.lists(st.floats(-1e6, 1e6, width=32), min_size=1,
                                                             max_size=5)),
       st.integers(0, 2**64 - 1), st.binary(max_size=40))
def test_header_round_trip(label, record_id, data):
    header, out = unpack(pack(IRHeader(0, label, record_id, 3), data))
    assert bytes(out) == data and header.id == record_id and header.id2 == 3
    if isinstance(label, list):
        assert header.flag == len(label) and header.label.tolist() == label
    else:
        assert header.flag == 0 and header.label == label


def test_image_pack_unpack_png_is_lossless():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    header, decoded = codec.unpack_img(codec.pack_img(IRHeader(0, 1.0, 2, 0), image, img_fmt=".png"))
    assert header.label == 1.0 and np.array_equal(decoded, image)
    # JPEG is lossy: a smooth image comes back close, channel order intact (BGR in, BGR out).
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[..., 0] = np.linspace(0, 200, 48)[None, :]
    smooth[..., 2] = 220
    _, jpeg = codec.unpack_img(codec.pack_img(IRHeader(0, 1.0, 2, 0), smooth, quality=95))
    assert jpeg.shape == smooth.shape and np.abs(jpeg.astype(int) - smooth).mean() < 3


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00\x00\x00\x05\x00\x00\x00hello\x00\x00\x00", "wrong magic"),
    (MAGIC_LE + b"\x10\x00\x00\x00abc", "truncated record"),
    (MAGIC_LE, "truncated record"),
    (MAGIC_LE + b"\x04\x00\x00\x20abcd", "truncated record"),  # cflag 1 with no continuation
    (MAGIC_LE + b"\x04\x00\x00\x40abcd", "continuation frame"),  # cflag 2 at a record start
    (MAGIC_LE + b"\x04\x00\x00\x20abcd" + MAGIC_LE + b"\x01\x00\x00\x00z\x00\x00\x00", "interrupted"),
])
def test_bad_frames_are_reported_with_offset(data, message):
    with pytest.raises(RecordIOError, match=message) as info:
        read_frame(data, 0, "x.rec", 7)
    assert "x.rec key 7" in str(info.value) and "at byte" in str(info.value)


def test_strict_padding_and_short_header():
    with pytest.raises(RecordIOError, match="non-zero padding"):
        read_frame(MAGIC_LE + b"\x01\x00\x00\x00a\x01\x00\x00", 0, strict=True)
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack(b"\x00" * 10)
    with pytest.raises(RecordIOError, match="announces 5 label floats"):
        unpack(struct.pack("<IfQQ", 5, 0, 0, 0) + b"\x00" * 8)
