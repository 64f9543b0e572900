"""pack_rec end to end: folder -> pack -> verify -> read back; resume after a kill; bad inputs; tools."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from recordio_tools.cli import main as pack_rec
from recordio_tools.dataset import open_dataset
from recordio_tools.errors import PackError
from recordio_tools.images import display_path
from recordio_tools.pack import PackOptions, pack
from recordio_tools.verification_bin import load_bin
from tests.paths import ROOT


def _image(identity, index, size=32):
    rng = np.random.default_rng(identity * 1000 + index)
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    cv2.circle(image, (size // 2, size // 2), size // 3, tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
    return image


def make_folder(root, counts, ext=".png", size=32, names=None):
    """root/<identity>/<n><ext>; returns {relative path: (label, BGR pixels as written)}."""
    written = {}
    for label, count in enumerate(counts):
        name = names[label] if names else f"id_{label:03d}"
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            path = root / name / f"{index:02d}{ext}"
            image = _image(label, index, size)
            assert cv2.imwrite(str(path), image) or path.write_bytes(cv2.imencode(ext, image)[1].tobytes())
            written[path] = (label, cv2.imread(str(path)))
    return written


def _read_back(prefix):
    dataset = open_dataset(prefix)
    return dataset, [(dataset.label(i), cv2.imdecode(np.frombuffer(dataset.read_image(i), np.uint8),
                                                   cv2.IMREAD_COLOR)) for i in range(len(dataset))]


@pytest.mark.parametrize("layout, shards, workers", [("insightface", 1, 1), ("insightface", 3, 2),
                                                     ("plain", 2, 1)])
def test_pack_verify_read_back_pixels_and_labels(tmp_path, layout, shards, workers, capsys):
    written = make_folder(tmp_path / "src", [3, 5, 1, 4, 2])
    args = ["pack", str(tmp_path / "src"), "-o", str(tmp_path / "out" / "train"), "--layout", layout,
            "--num-shards", str(shards), "--workers", str(workers), "--format", ".png", "--quiet"]
    if layout == "plain":
        args += ["--shuffle", "--seed", "3"]
    assert pack_rec(args) == 0
    assert pack_rec(["verify", "--quiet", str(tmp_path / "out" / "train.manifest.json")]) == 0
    dataset, records = _read_back(tmp_path / "out" / "train")
    assert dataset.num_shards == shards and dataset.num_classes == 5 and len(dataset) == 15
    # every source image appears exactly once with its label and identical pixels (PNG is lossless)
    expected = sorted((label, image.tobytes()) for label, image in written.values())
    assert sorted((label, image.tobytes()) for label, image in records) == expected
    if layout == "insightface":
        assert dataset.labels.tolist() == sorted(dataset.labels.tolist())
        for label, (start, end) in enumerate(dataset.identity_ranges.tolist()):
            assert set(dataset.labels[start:end].tolist()) == {label}
        assert (tmp_path / "out" / "property").read_text() == "5,32,32"
        for shard in dataset.shards:  # each shard stands alone as an InsightFace file
            alone = open_dataset(shard.reader.rec_path)
            assert alone.labels.tolist() == shard.labels.tolist()
    else:
        assert dataset.labels.tolist() != sorted(dataset.labels.tolist())  # shuffled
    assert pack_rec(["info", str(tmp_path / "out" / "train")]) == 0
    assert "images       15" in capsys.readouterr().out


def test_pass_through_keeps_jpeg_bytes_and_resize(tmp_path):
    written = make_folder(tmp_path / "src", [2, 2], ext=".jpg", size=40)
    result = pack(tmp_path / "src", tmp_path / "a" / "train", PackOptions(pass_through=True, progress=False))
    dataset = open_dataset(result.manifest)
    originals = sorted(path.read_bytes() for path in written)
    assert sorted(bytes(dataset.read_image(i)) for i in range(4)) == originals
    pack(tmp_path / "src", tmp_path / "b" / "train", PackOptions(resize=(24, 24), quality=90, progress=False))
    resized = open_dataset(tmp_path / "b" / "train")
    assert resized.image_size == (24, 24)
    assert cv2.imdecode(np.frombuffer(resized.read_image(0), np.uint8), 1).shape == (24, 24, 3)


def test_im2rec_list_source(tmp_path):
    make_folder(tmp_path / "src", [2, 3])
    files = sorted((tmp_path / "src").rglob("*.png"))
    lines = [f"{i}\t{float(int(p.parent.name[-1]) ):.6f}\t{p.relative_to(tmp_path / 'src')}"
             for i, p in enumerate(files)]
    (tmp_path / "src" / "train.lst").write_text("\n".join(lines) + "\n")
    result = pack(tmp_path / "src" / "train.lst", tmp_path / "o" / "train",
                  PackOptions(img_fmt=".png", progress=False))
    dataset = open_dataset(result.manifest)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1]


def _run_pack(tmp_path, extra, kill_after=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if kill_after is not None:
        env["PACK_REC_TEST_KILL_AFTER"] = str(kill_after)
    command = [sys.executable, "-m", "recordio_tools.cli", "pack", str(tmp_path / "src"),
               "-o", str(tmp_path / "out" / "train"), "--format", ".png", "--quiet", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after, extra", [(7, ["--num-shards", "3"]), (2, ["--layout", "plain"]),
                                               (9, ["--num-shards", "2", "--workers", "2"])])
def test_resume_after_killed_pack(tmp_path, kill_after, extra, capsys):
    written = make_folder(tmp_path / "src", [4, 3, 5, 2])
    killed = _run_pack(tmp_path, extra, kill_after)
    assert killed.returncode == -9, killed.stderr
    out = tmp_path / "out"
    # nothing looks complete: no manifest, shards still under temporary names or closed-and-journaled
    assert not (out / "train.manifest.json").exists()
    assert (out / "train.pack-journal.json").exists()
    # ... and nothing opens as a dataset: the message names the command that finishes the pack
    for name in (out, out / "train", out / "train.manifest.json"):
        for command in (["verify", "--quiet"], ["info"]):
            assert pack_rec([*command, str(name)]) == 2  # not a dataset yet: an input error
            err = capsys.readouterr().err
            assert "incomplete pack:" in err and f"{out / 'train'} " in err and "--resume`" in err, err
    refused = _run_pack(tmp_path, extra)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    resumed = _run_pack(tmp_path, [*extra, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert pack_rec(["verify", "--quiet", str(out / "train")]) == 0
    _, records = _read_back(out / "train")
    expected = sorted((label, image.tobytes()) for label, image in written.values())
    assert sorted((label, image.tobytes()) for label, image in records) == expected  # no loss, no duplicate
    assert not list(out.glob("*.tmp")) and not (out / "train.pack-journal.json").exists()


def test_bad_inputs_reported_and_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    make_folder(src, [2, 2], names=["alice", "bob"])
    (src / "empty").mkdir()
    (src / "bob" / "notes.txt").write_text("hello")
    (src / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (src / "zoë").mkdir()
    cv2.imencode(".png", _image(9, 9))[1].tofile(str(src / "zoë" / "émile.png"))
    assert pack_rec(["pack", str(src), "-o", str(tmp_path / "o" / "train"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "empty identity folder" in err and "notes.txt" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "train.manifest.json").exists()
    # scanning problems skipped, then the undecodable image stops the pack (named) ...
    assert pack_rec(["pack", str(src), "-o", str(tmp_path / "o" / "train"), "--quiet", "--skip-bad",
                     "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 bad input(s)" in out and "broken.jpg" in out and "does not decode" in out
    dataset = open_dataset(tmp_path / "o" / "train")
    assert len(dataset) == 5 and dataset.num_classes == 3  # alice, bob, zoë (non-ASCII names work)
    assert "zoë" in (tmp_path / "o" / "train.classes.tsv").read_text(encoding="utf-8")
    (src / "bob" / "notes.txt").unlink()
    (src / "empty").rmdir()
    with pytest.raises(PackError, match="broken.jpg.*does not decode"):
        pack(src, tmp_path / "p" / "train", PackOptions(progress=False))


def test_unreadable_and_missing_paths(tmp_path, capsys):
    assert pack_rec(["pack", str(tmp_path / "missing"), "-o", str(tmp_path / "o" / "t"), "--quiet"]) == 2
    assert "source not found" in capsys.readouterr().err
    lst = tmp_path / "a.lst"
    lst.write_text("0\t0\tnope.png\n1\tx\tother.png\n")
    assert pack_rec(["pack", str(lst), "-o", str(tmp_path / "o" / "t"), "-q", "--list-format", "im2rec"]) == 2
    err = capsys.readouterr().err
    assert "a.lst line 2" in err and "not a number" in err
    lst.write_text("0\t0\tnope.png\n")
    with pytest.raises(PackError, match="nope.png.*unreadable image file"):
        pack(lst, tmp_path / "o" / "t", PackOptions(progress=False))
    assert pack_rec(["info", str(tmp_path / "nothing")]) == 2
    assert "no dataset here" in capsys.readouterr().err


def test_existing_pack_not_overwritten(tmp_path):
    make_folder(tmp_path / "src", [1, 1])
    pack(tmp_path / "src", tmp_path / "o" / "train", PackOptions(progress=False))
    with pytest.raises(PackError, match="already exists"):
        pack(tmp_path / "src", tmp_path / "o" / "train", PackOptions(progress=False))
    pack(tmp_path / "src", tmp_path / "o" / "train", PackOptions(progress=False, overwrite=True))


def test_unpack_and_contact_sheet(tmp_path, capsys):
    make_folder(tmp_path / "src", [3, 2, 2])
    pack(tmp_path / "src", tmp_path / "o" / "train", PackOptions(img_fmt=".png", progress=False))
    sheet = tmp_path / "sheet.png"
    assert pack_rec(["unpack", str(tmp_path / "o"), "-o", str(tmp_path / "u"), "--classes", "0,2",
                     "--contact-sheet", str(sheet), "--columns", "3"]) == 0
    files = sorted((tmp_path / "u").rglob("*.png"))
    assert [f.parent.name for f in files] == ["0", "0", "0", "2", "2"]
    image = cv2.imread(str(sheet))
    assert image.shape == (2 * (112 + 16), 3 * 112, 3)
    dataset = open_dataset(tmp_path / "o")
    assert files[0].read_bytes() == bytes(dataset.read_image(int(files[0].stem)))


def test_bin_from_pairs(tmp_path):
    make_folder(tmp_path / "imgs", [2, 2], ext=".jpg", size=112)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("id_000/00.jpg id_000/01.jpg 1\nid_000/00.jpg id_001/00.jpg 0\n")
    assert pack_rec(["bin", str(pairs), "-o", str(tmp_path / "p.bin"), "--root", str(tmp_path / "imgs")]) == 0
    bins, issame = load_bin(tmp_path / "p.bin")
    assert issame == [True, False] and bins[0] == (tmp_path / "imgs" / "id_000" / "00.jpg").read_bytes()
    # LFW pairs.txt style: header, "name n1 n2" same, "name1 n1 name2 n2" different; resized to 112
    lfw = tmp_path / "lfw"
    for name in ("Ann_Lee", "Bo"):
        (lfw / name).mkdir(parents=True)
        for number in (1, 2):
            cv2.imwrite(str(lfw / name / f"{name}_{number:04d}.jpg"), _image(number, len(name), 64))
    (tmp_path / "lfw_pairs.txt").write_text("1\t2\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo\t2\n")
    assert pack_rec(["bin", str(tmp_path / "lfw_pairs.txt"), "-o", str(tmp_path / "l.bin"),
                     "--root", str(lfw)]) == 0
    bins, issame = load_bin(tmp_path / "l.bin")
    assert issame == [True, False] and len(bins) == 4
    assert cv2.imdecode(np.frombuffer(bins[3], np.uint8), 1).shape == (112, 112, 3)
    (tmp_path / "bad.txt").write_text("a.jpg b.jpg maybe\n")
    assert pack_rec(["bin", str(tmp_path / "bad.txt"), "-o", str(tmp_path / "x.bin")]) == 2


def test_alignment_list(tmp_path):
    from recordio_tools.images import read_list

    make_folder(tmp_path / "src", [1, 1], size=112)
    # aligned, path, label, bbox (4), landmarks x1..x5 then y1..y5 (InsightFace order)
    xs, ys = "38.3\t73.5\t56.0\t41.5\t70.7", "51.7\t51.5\t71.7\t92.4\t92.2"
    lines = [f"1\tid_000/00.png\t0\t0\t0\t112\t112\t{xs}\t{ys}",
             f"0\tid_001/00.png\t1\t0\t0\t112\t112\t{xs}\t{ys}"]
    lst = tmp_path / "src" / "align.lst"
    lst.write_text("\n".join(lines) + "\n")
    source = read_list(lst)
    assert source.kind == "align" and [item.aligned for item in source.items] == [True, False]
    np.testing.assert_allclose(source.items[1].landmarks[:, 0], [38.3, 73.5, 56.0, 41.5, 70.7], rtol=1e-6)
    np.testing.assert_allclose(source.items[1].landmarks[:, 1], [51.7, 51.5, 71.7, 92.4, 92.2], rtol=1e-6)
    options = PackOptions(img_fmt=".png", progress=False)
    from recordio_tools.align import align_face

    dataset = open_dataset(pack(lst, tmp_path / "o" / "train", options).manifest)
    stored = cv2.imdecode(np.frombuffer(dataset.read_image(1), np.uint8), 1)
    expected = align_face(cv2.imread(str(tmp_path / "src" / "id_001" / "00.png")), source.items[1].landmarks)
    assert np.array_equal(stored, expected)


def test_a_file_that_is_not_recordio_is_named_as_such(tmp_path, capsys):
    """info/verify say "not a RecordIO file: bad magic at offset 0" (not "rebuild the index"), and
    reindex refuses instead of writing an empty index that would then read as an empty dataset."""
    photo = tmp_path / "photo.rec"
    photo.write_bytes(cv2.imencode(".jpg", _image(1, 1))[1].tobytes())
    for command in (["info"], ["verify", "--quiet"], ["reindex"]):
        assert pack_rec([*command, str(photo)]) == 2, command
        captured = capsys.readouterr()
        err = captured.out + captured.err  # verify lists problems on stdout
        assert f"{photo}: not a RecordIO file: bad magic at offset 0 (found bytes ff d8 ff e0" in err, err
        assert "reindex" not in err.replace("pack_rec reindex:", ""), err
    assert not (tmp_path / "photo.idx").exists() and not list(tmp_path.glob("*.idx*"))
    # an index already beside it is left alone (not moved to .bak, not replaced)
    (tmp_path / "photo.idx").write_text("1\t0\n")
    assert pack_rec(["reindex", str(photo)]) == 2
    assert (tmp_path / "photo.idx").read_text() == "1\t0\n" and not (tmp_path / "photo.idx.bak").exists()
    assert pack_rec(["info", str(photo)]) == 2
    assert "not a RecordIO file: bad magic at offset 0" in capsys.readouterr().err
    # named without .rec: same answer for any file that is not RecordIO
    (tmp_path / "notes.txt").write_text("hello\n")
    assert pack_rec(["info", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt: not a RecordIO file: bad magic at offset 0 (found bytes 68 65 6c 6c" in \
        capsys.readouterr().err
    # the magic word and then nothing readable: no record, so no index either
    (tmp_path / "torn.rec").write_bytes(b"\x0a\x23\xd7\xce" + b"\xff" * 40)
    assert pack_rec(["reindex", str(tmp_path / "torn.rec")]) == 2
    assert "no readable record" in capsys.readouterr().err and not (tmp_path / "torn.idx").exists()


def test_bin_missing_image_says_where_it_looked(tmp_path, capsys):
    make_folder(tmp_path / "imgs", [2], ext=".jpg", size=112)
    pairs = tmp_path / "lists" / "pairs.txt"
    pairs.parent.mkdir()
    pairs.write_text("../imgs/id_000/00.jpg ../imgs/id_000/01.jpg 1\n"
                     "../imgs/id_000/00.jpg ../imgs/id_000/07.jpg 0\n")
    assert pack_rec(["bin", str(pairs), "-o", str(tmp_path / "p.bin")]) == 2
    err = capsys.readouterr().err
    missing = display_path(tmp_path / "imgs" / "id_000" / "07.jpg")
    assert f"{pairs}: line 2: image not found: looked for {missing}" in err, err
    assert f"the pairs file's folder {pairs.parent}; pass --root DIR" in err
    assert pack_rec(["bin", str(pairs), "-o", str(tmp_path / "p.bin"), "--root",
                     str(tmp_path / "a" / "b")]) == 2
    err = capsys.readouterr().err
    looked = display_path(tmp_path / "a" / "imgs" / "id_000" / "00.jpg")
    assert f"line 1: image not found: looked for {looked}" in err, err
    assert f"--root {tmp_path / 'a' / 'b'}" in err, err
    assert not (tmp_path / "p.bin").exists()
