"""open_dataset path forms, shards, fork safety, .bin safety and damaged-file errors."""

import multiprocessing
import os
import pickle
import shutil

import numpy as np
import pytest

from recordio_tools.cli import main as pack_rec
from recordio_tools.cli import reindex, verify_dataset
from recordio_tools.codec import IRHeader, pack
from recordio_tools.dataset import open_dataset
from recordio_tools.errors import RecordIOError, UnsafePickleError
from recordio_tools.verification_bin import load_bin, write_bin
from recordio_tools.writer import FaceDatasetWriter, IndexedRecordWriter


@pytest.fixture
def golden(data_dir, tmp_path):
    target = tmp_path / "golden"
    shutil.copytree(data_dir / "mxnet_golden" / "insightface_layout", target)
    return target


def test_path_forms_resolve_to_the_same_dataset(golden):
    forms = [golden, golden / "train.rec", golden / "train.idx", golden / "train"]
    datasets = [open_dataset(form) for form in forms]
    for dataset in datasets:
        assert len(dataset) == 32 and dataset.labels.tolist() == datasets[0].labels.tolist()
    with pytest.raises(RecordIOError, match="no dataset here"):
        open_dataset(golden / "nothing")


def _read_in_child(dataset, index, queue):
    queue.put(bytes(dataset.read_image(index)))


def test_fork_safe_after_parent_read(golden):
    dataset = open_dataset(golden)
    expected = bytes(dataset.read_image(7))  # parent maps the file first
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(dataset, 7, queue))
    child.start()
    got = queue.get(timeout=30)
    child.join(timeout=30)
    assert got == expected and child.exitcode == 0
    # a spawned-style copy: pickled without its map
    state = pickle.loads(pickle.dumps(dataset))
    assert all(shard.reader._view is None for shard in state.shards)


def _small_writer(prefix, layout, labels, class_start=0, num_classes=None):
    writer = FaceDatasetWriter(prefix, layout, class_start, num_classes)
    for label in labels:
        writer.add(label, b"\xff\xd8payload" + bytes([label]))
    writer.close()


def test_manual_shards_with_manifest(tmp_path):
    from recordio_tools.shards import Manifest, ShardInfo, file_sha256

    _small_writer(tmp_path / "d-00000-of-00002", "insightface", [0, 0, 1], 0, 2)
    _small_writer(tmp_path / "d-00001-of-00002", "insightface", [2, 3, 3, 3], 2, 2)
    infos = [ShardInfo(f"d-0000{i}-of-00002.rec", f"d-0000{i}-of-00002.idx", n + 3, n, i * 2, 2,
                       file_sha256(tmp_path / f"d-0000{i}-of-00002.rec"), 0) for i, n in ((0, 3), (1, 4))]
    Manifest("insightface", 4, 7, [112, 112], infos).write(tmp_path / "d.manifest.json")
    dataset = open_dataset(tmp_path / "d")
    assert dataset.labels.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert dataset.identity_ranges.tolist() == [[0, 2], [2, 3], [3, 4], [4, 7]]
    assert dataset.describe(4) == f"{tmp_path / 'd-00001-of-00002.rec'} key 2"
    assert bytes(dataset.read_image(4))[-1] == 3 and dataset.shard_of(4) == 1
    assert verify_dataset(tmp_path / "d.manifest.json", check_images=False) == []
    # a changed shard is caught by its checksum
    with open(tmp_path / "d-00001-of-00002.rec", "r+b") as handle:
        handle.seek(40)
        handle.write(b"Z")
    assert any("checksum" in problem for problem in verify_dataset(tmp_path / "d.manifest.json", False))


def test_idx_past_end_and_into_record(golden):
    idx = golden / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1] + ["0\t999999"]) + "\n")
    with pytest.raises(RecordIOError, match="past the end") as info:
        open_dataset(golden)
    assert "key 0" in str(info.value) and "999999" in str(info.value)
    idx.write_text("\n".join(lines[:2] + ["3\t4424"] + lines[3:]) + "\n")  # 4 bytes into record 2
    problems = verify_dataset(golden)
    assert any("key 3 at byte 4424" in p and "not the start of a record" in p for p in problems)
    assert pack_rec(["verify", "--quiet", str(golden)]) == 1
    with pytest.raises(RecordIOError, match="wrong magic"):
        open_dataset(golden).read_image(2)


def test_wrong_magic_and_truncation_reported_by_verify(golden, capsys):
    rec = golden / "train.rec"
    data = bytearray(rec.read_bytes())
    data[4420:4424] = b"\x00\x00\x00\x00"  # key 2's magic
    rec.write_bytes(bytes(data[:100000]))  # and cut the file mid-record
    problems = verify_dataset(golden)
    text = "\n".join(problems)
    assert "at byte 4420: wrong magic" in text
    assert "truncated record" in text
    assert "key 2 at byte 4420" in text  # the .idx entry of the damaged record
    assert pack_rec(["verify", "--quiet", str(golden)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "wrong magic" in out.out


def test_undecodable_image_and_label_out_of_range(tmp_path):
    writer = IndexedRecordWriter(tmp_path / "bad")
    writer.write(0, pack(IRHeader(0, 0.0, 0, 0), b"not a jpeg"))
    writer.write(1, pack(IRHeader(0, 5.0, 1, 0), b"also not"))
    writer.close()
    (tmp_path / "property").write_text("2,112,112")
    problems = verify_dataset(tmp_path / "bad.rec")
    assert any("key 0" in p and "does not decode" in p for p in problems)
    assert any("key 1" in p and "label 5 out of range" in p for p in problems)
    with pytest.raises(RecordIOError, match="label 5 out of range") as info:
        open_dataset(tmp_path / "bad.rec")
    assert "key 1" in str(info.value)


def test_reindex_rebuilds_lost_index(golden, capsys):
    original = (golden / "train.idx").read_text()
    (golden / "train.idx").unlink()
    with pytest.raises(RecordIOError, match="index file not found"):
        open_dataset(golden / "train.rec")
    assert pack_rec(["reindex", str(golden / "train.rec")]) == 0
    # MXNet's index lists keys in write order; ours is file order too: same lines.
    assert (golden / "train.idx").read_text() == original
    (golden / "train.idx").write_text("garbage\n")
    _, count, problems = reindex(golden / "train.rec")
    assert count == 41 and not problems and (golden / "train.idx.bak").read_text() == "garbage\n"


def test_malformed_idx_line_named(golden):
    (golden / "train.idx").write_text("1\t0\n2\tabc\n")
    with pytest.raises(RecordIOError, match="line 2"):
        open_dataset(golden)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_bin_refuses_code_and_round_trips(tmp_path):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"a", b"b"], [_Evil()])))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system") as info:
        load_bin(evil)
    assert str(evil) in str(info.value)
    numpy_pack = tmp_path / "np.bin"
    numpy_pack.write_bytes(pickle.dumps(([b"a", b"b"], np.array([True]))))
    with pytest.raises(UnsafePickleError, match="numpy"):
        load_bin(numpy_pack)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps(([b"a"], [True])))
    with pytest.raises(RecordIOError, match="1 images for 1 pairs"):
        load_bin(wrong)
    path = write_bin(tmp_path / "ok.bin", [b"x", b"y", b"z", b"w"], [True, False])
    assert load_bin(path) == ([b"x", b"y", b"z", b"w"], [True, False])
    # Python-2 style: str payloads under protocol 2 come back as bytes with encoding="bytes";
    # Python 3 bytes under protocol 2 go through _codecs.encode, which is admitted.
    proto2 = tmp_path / "p2.bin"
    proto2.write_bytes(pickle.dumps(([b"\xff\xd8a", b"b"], [False]), protocol=2))
    assert load_bin(proto2) == ([b"\xff\xd8a", b"b"], [False])
    py2 = tmp_path / "py2.bin"  # hand-made protocol-2 pickle of (['ab', 'cd'], [True]) with py2 str
    py2.write_bytes(b"\x80\x02]q\x00(U\x02abq\x01U\x02cdq\x02e]q\x03\x88a\x86q\x04.")
    assert load_bin(py2) == ([b"ab", b"cd"], [True])


def test_plain_layout_labels_from_headers(tmp_path):
    _small_writer(tmp_path / "p", "plain", [3, 1, 2, 0, 3])
    dataset = open_dataset(tmp_path / "p.rec")
    assert dataset.layout == "plain" and dataset.identity_ranges is None
    assert dataset.labels.tolist() == [3, 1, 2, 0, 3] and dataset.num_classes == 4
    assert np.array_equal(dataset.labels, dataset.labels.astype(np.int64))
