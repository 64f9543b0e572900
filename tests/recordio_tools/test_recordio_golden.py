"""The reader against files written by the real MXNet 1.9.1 (tests/data/mxnet_golden, see its README)."""

import hashlib
import json
import pickle
import shutil

import cv2
import numpy as np
import pytest

from recordio_tools.cli import main as pack_rec
from recordio_tools.cli import verify_dataset
from recordio_tools.codec import unpack
from recordio_tools.dataset import open_dataset
from recordio_tools.reader import IndexedRecordReader
from recordio_tools.verification_bin import load_bin
from recordio_tools.writer import FaceDatasetWriter

LAYOUTS = ["insightface_layout", "im2rec_layout"]


def _expected(data_dir, layout):
    return json.loads((data_dir / "mxnet_golden" / layout / "expected.json").read_text())


def _rgb_mean(data):
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return bgr[..., ::-1].reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_image_bytes_label_and_colour(data_dir, layout):
    expected = _expected(data_dir, layout)
    reader = IndexedRecordReader(data_dir / "mxnet_golden" / layout / "train.rec")
    for key, want in expected["images"].items():
        header, data = unpack(reader.read(int(key)))
        assert hashlib.md5(data).hexdigest() == want["md5"], key
        label = header.label.tolist() if header.flag else header.label
        assert label == want["label"], key
        np.testing.assert_allclose(_rgb_mean(data), want["rgb_mean"], atol=0.01)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dataset_view_matches_expected(data_dir, layout):
    expected = _expected(data_dir, layout)
    dataset = open_dataset(data_dir / "mxnet_golden" / layout)
    keys = sorted(int(key) for key in expected["images"])
    assert len(dataset) == len(keys) == 32 and dataset.num_classes == 8
    for index, key in enumerate(keys):
        want = expected["images"][str(key)]
        assert dataset.key_of(index) == (0, key)
        assert hashlib.md5(dataset.read_image(index)).hexdigest() == want["md5"]
        label = want["label"][0] if isinstance(want["label"], list) else want["label"]
        assert dataset.label(index) == label and dataset.labels[index] == label
    assert dataset.labels.dtype == np.int64


def test_insightface_header_identities_and_multipart(data_dir):
    expected = _expected(data_dir, "insightface_layout")
    folder = data_dir / "mxnet_golden" / "insightface_layout"
    reader = IndexedRecordReader(folder / "train.rec")
    header0 = reader.header(0)
    assert header0.flag == 2 and header0.label.tolist() == expected["header0"]
    dataset = open_dataset(folder)
    assert dataset.layout == "insightface" and dataset.image_size == (112, 112)
    # identity ranges are image keys [start, end); image index = key - 1
    assert (dataset.identity_ranges + 1).tolist() == expected["identity_ranges"]
    multipart = expected["multipart_key"]
    offset = reader.offset_of(multipart)
    raw = (folder / "train.rec").read_bytes()
    assert (int.from_bytes(raw[offset + 4:offset + 8], "little") >> 29) == 1  # stored as cflag 1 ... 3
    header, data = unpack(reader.read(multipart))
    assert hashlib.md5(data).hexdigest() == expected["images"][str(multipart)]["md5"]


def test_writer_reproduces_mxnet_file_byte_for_byte(data_dir, tmp_path):
    folder = data_dir / "mxnet_golden" / "insightface_layout"
    source = open_dataset(folder)
    writer = FaceDatasetWriter(tmp_path / "train", "insightface", 0, source.num_classes)
    for index in range(len(source)):
        writer.add(source.label(index), source.read_image(index))
    writer.close()
    assert (tmp_path / "train.rec").read_bytes() == (folder / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_bytes() == (folder / "train.idx").read_bytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verify_passes_on_golden(data_dir, layout, capsys):
    path = data_dir / "mxnet_golden" / layout
    assert verify_dataset(path) == []
    assert pack_rec(["verify", "--quiet", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_pairs_bin_loads(data_dir):
    bins, issame = load_bin(data_dir / "mxnet_golden" / "pairs.bin")
    assert len(bins) == 24 and issame == [index % 2 == 0 for index in range(12)]
    for data in bins:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (112, 112, 3)


def test_reader_is_picklable_and_reads_after_unpickle(data_dir, tmp_path):
    shutil.copytree(data_dir / "mxnet_golden" / "insightface_layout", tmp_path / "d")
    dataset = open_dataset(tmp_path / "d")
    first = bytes(dataset.read_image(3))
    clone = pickle.loads(pickle.dumps(dataset))
    assert bytes(clone.read_image(3)) == first and clone.num_classes == 8
