"""Interrupted packs: `--resume` from any point finishes byte-identical files, and until then the output is
refused as a dataset (folder, prefix, manifest, shard) with the command that finishes it.

Interruptions are injected at chosen *lines* of the packing code (``sys.settrace`` counts the lines
executed in ``recordio_tools/pack.py``, ``writer.py`` and ``shards.py``), in two ways:

* ``"ctrl-c"``: ``KeyboardInterrupt`` is raised there, so every ``except``/``finally`` runs (Ctrl-C);
* ``"kill"``: the output folder is copied as it is on disk at that line, the run is unwound, and the copy
  replaces the folder: the state a SIGKILL or a power cut leaves (data still in Python's buffers is lost,
  no cleanup runs).

The reference is the same pack run once without interruption; every file of the resumed output (names and
bytes, side files and manifest included) must equal it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from test_pack_rec_cli import make_folder

import recordio_tools.pack as pack_module
import recordio_tools.shards as shards_module
import recordio_tools.writer as writer_module
from recordio_tools.cli import main as pack_rec
from recordio_tools.dataset import open_dataset
from recordio_tools.errors import RecordIOError
from recordio_tools.pack import PackOptions, pack

TRACED = {os.path.realpath(module.__file__) for module in (pack_module, writer_module, shards_module)}
# Where the fast tests interrupt: each line of these functions (the end of a shard, the journal, the side
# files and the manifest) at its first and its last execution, i.e. at the first and the last shard
# boundary. The slow test interrupts at every line.
BOUNDARY = {("writer.py", "finish"), ("writer.py", "commit"), ("writer.py", "identity_ranges"),
            ("writer.py", "close_partial"), ("pack.py", "pack"), ("pack.py", "_write_json_atomic"),
            ("pack.py", "_write_side_files"), ("pack.py", "_write_text_atomic"),
            ("pack.py", "_probe_image_size"), ("pack.py", "_commit_recorded_shard"), ("shards.py", "write")}


class _Killed(BaseException):
    """Unwinds a run whose on-disk state was already saved (the "kill" mode)."""


class _LineTracer:
    """Counts lines executed in the packing modules; at line ``stop`` interrupts (see the module doc)."""

    def __init__(self, stop: int | None = None, mode: str = "ctrl-c", folder: Path | None = None) -> None:
        self.stop, self.mode, self.folder = stop, mode, folder
        self.count = 0
        self.where: list[tuple[str, str, int]] = []
        self._traced: dict = {}

    def _global(self, frame, event, arg):
        code = frame.f_code
        hit = self._traced.get(code)
        if hit is None:
            hit = self._traced[code] = os.path.realpath(code.co_filename) in TRACED
        return self._local if hit else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.stop is None:
                self.where.append((Path(frame.f_code.co_filename).name, frame.f_code.co_name, frame.f_lineno))
            elif self.count == self.stop:
                if self.mode == "kill":
                    shutil.copytree(self.folder, self.folder.with_name(self.folder.name + ".on-disk"))
                    raise _Killed
                raise KeyboardInterrupt
        return self._local

    def run(self, function, *args, **kwargs) -> bool:
        """``function(*args, **kwargs)`` under the tracer; True when it ran to the end."""
        sys.settrace(self._global)
        try:
            function(*args, **kwargs)
            return True
        except (KeyboardInterrupt, _Killed):
            pass
        finally:
            sys.settrace(None)
        if self.mode == "kill":
            on_disk = self.folder.with_name(self.folder.name + ".on-disk")
            shutil.rmtree(self.folder)
            on_disk.rename(self.folder)
        return False


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """6 identities, 18 PNGs, plus one image that does not decode (skipped with --skip-bad)."""
    root = tmp_path_factory.mktemp("resume") / "src"
    make_folder(root, [3, 4, 2, 5, 1, 3], size=16)
    (root / "id_001" / "02b.png").write_bytes(b"not an image at all")
    return root


VARIANTS = {
    "insightface-3-shards": dict(num_shards=3, skip_bad=True),
    "plain-2-shards-shuffled": dict(layout="plain", num_shards=2, shuffle=True, seed=5, skip_bad=True),
}


def _options(variant: str, **extra) -> PackOptions:
    return PackOptions(img_fmt=".png", progress=False, **VARIANTS[variant], **extra)


def _reference(source: Path, folder: Path, variant: str) -> tuple[dict[str, bytes], list]:
    """Files of an uninterrupted pack, and the lines it executes."""
    tracer = _LineTracer()
    assert tracer.run(pack, source, folder / "train", _options(variant))
    return _files(folder), tracer.where


def _check_refused_or_complete(folder: Path, expected: dict[str, bytes]) -> None:
    """Whatever an interruption left: either exactly the finished pack, or nothing that opens."""
    if _files(folder) == expected:
        open_dataset(folder / "train").close()
        return
    for name in (folder, folder / "train", folder / "train.manifest.json",
                 *[folder / name for name in expected if name.endswith(".rec")]):
        with pytest.raises(RecordIOError):
            open_dataset(name).close()
        if (folder / "train.pack-journal.json").exists():
            with pytest.raises(RecordIOError, match="incomplete pack"):
                open_dataset(name)


def _resume(source: Path, folder: Path, variant: str, tracer: _LineTracer | None = None) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no interrupted pack to resume" when stopped before the journal
        if tracer is None:
            pack(source, folder / "train", _options(variant, resume=True))
            return True
        return tracer.run(pack, source, folder / "train", _options(variant, resume=True))


def _points(where: list[tuple[str, str, int]], stride: int) -> list[int]:
    """1-based line numbers to interrupt at: the first and the last execution of every line of the
    ``BOUNDARY`` functions, and every ``stride``-th line of the whole run (images being written); none
    before the journal is first written (nothing is on disk then)."""
    start = next(number for number, line in enumerate(where, start=1) if line[1] == "_write_json_atomic")
    first: dict[tuple[str, str, int], int] = {}
    last: dict[tuple[str, str, int], int] = {}
    for number, line in enumerate(where[start - 1:], start=start):
        if line[:2] in BOUNDARY:
            first.setdefault(line, number)
            last[line] = number
    sampled = range(start + stride, len(where) + 1, stride)
    return sorted(set(first.values()) | set(last.values()) | set(sampled))


def _after_first_commit(where: list[tuple[str, str, int]]) -> int:
    """The line after the first shard got its final names (the journal records 1 finished shard)."""
    numbers = [number for number, (name, function, _) in enumerate(where, start=1)
               if name == "writer.py" and function == "commit"]
    end = numbers[0]
    while end + 1 in numbers:
        end += 1
    return end + 1


def _interrupt_and_resume(source: Path, tmp_path: Path, variant: str, stops: list[int], mode: str,
                          expected: dict[str, bytes], second_stop: int | None = None) -> None:
    for stop in stops:
        folder = tmp_path / f"{mode}-{stop}"
        folder.mkdir()
        finished = _LineTracer(stop, mode, folder).run(pack, source, folder / "train", _options(variant))
        assert not finished, stop
        _check_refused_or_complete(folder, expected)
        if second_stop is not None:  # interrupted again while resuming
            _resume(source, folder, variant, _LineTracer(second_stop, mode, folder))
            _check_refused_or_complete(folder, expected)
        _resume(source, folder, variant)
        assert _files(folder) == expected, (mode, stop)
        shutil.rmtree(folder)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["ctrl-c", "kill"])
def test_resume_from_every_boundary_gives_the_same_bytes(source, tmp_path, monkeypatch, variant, mode):
    # Records reach the disk one by one, so "kill" leaves partial shards rather than empty ones.
    monkeypatch.setattr(pack_module, "FLUSH_EVERY", 1)
    expected, where = _reference(source, tmp_path / "reference", variant)
    assert "train.skipped.tsv" in expected and "train.manifest.json" in expected
    stops = _points(where, stride=41)
    assert len(stops) >= 100
    _interrupt_and_resume(source, tmp_path, variant, stops, mode, expected)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ctrl-c", "kill"])
def test_resume_from_every_line_and_twice(source, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(pack_module, "FLUSH_EVERY", 1)
    variant = "insightface-3-shards"
    expected, where = _reference(source, tmp_path / "reference", variant)
    _interrupt_and_resume(source, tmp_path, variant, list(range(1, len(where) + 1)), mode, expected)
    # interrupted, then interrupted again while resuming, then resumed
    _interrupt_and_resume(source, tmp_path, variant, list(range(7, len(where), 61)), mode, expected,
                          second_stop=len(where) // 3)


@pytest.mark.slow
def test_resume_with_worker_processes(source, tmp_path, monkeypatch):
    """Encoding in 2 worker processes: the same bytes as with one, and resumable at the boundaries."""
    monkeypatch.setattr(pack_module, "FLUSH_EVERY", 1)
    expected, _ = _reference(source, tmp_path / "one-worker", "insightface-3-shards")
    VARIANTS["insightface-3-shards-workers"] = dict(VARIANTS["insightface-3-shards"], workers=2)
    try:
        variant = "insightface-3-shards-workers"
        with_workers, where = _reference(source, tmp_path / "reference", variant)
        assert with_workers == expected
        _interrupt_and_resume(source, tmp_path, variant, _points(where, stride=97)[::5], "kill", expected)
    finally:
        del VARIANTS["insightface-3-shards-workers"]


def test_partial_pack_is_refused_every_way_with_the_command_that_finishes_it(source, tmp_path, capsys):
    """One of four shards finished: verify/info/open_dataset refuse the folder, the prefix, the finished
    shard and the (absent) manifest; the message's command finishes the pack as an uninterrupted one."""
    reference = tmp_path / "reference"
    assert pack_rec(["pack", str(source), "-o", str(reference / "train"), "--num-shards", "4", "--format",
                     ".png", "--skip-bad", "--quiet"]) == 0
    expected = _files(reference)
    out = tmp_path / "out"
    out.mkdir()
    tracer = _LineTracer()
    args = ["pack", str(source), "-o", str(out / "train"), "--num-shards", "4", "--format", ".png",
            "--skip-bad", "--quiet"]
    assert tracer.run(pack_rec, args)
    shutil.rmtree(out)
    out.mkdir()
    assert not _LineTracer(_after_first_commit(tracer.where), "kill", out).run(pack_rec, args)
    assert sorted(path.name for path in out.glob("*.rec")) == ["train-00000-of-00004.rec"]
    capsys.readouterr()
    names = [out, out / "train", out / "train.manifest.json", out / "train-00000-of-00004.rec",
             out / "train-00000-of-00004.idx"]
    for name in names:
        for command in (["verify", "--quiet"], ["info"]):
            assert pack_rec([*command, str(name)]) == 2, (command, name)
            err = capsys.readouterr().err
            assert "incomplete pack: 1 of 4 shards; rerun `pack_rec pack" in err, (command, name, err)
            assert str(out / "train") in err and "--resume`" in err and "Traceback" not in err
        with pytest.raises(RecordIOError, match=r"incomplete pack: 1 of 4 shards"):
            open_dataset(name)
    # the command in the message, run as printed, finishes the pack: the same bytes as uninterrupted
    assert pack_rec(["info", str(out)]) == 2
    command = capsys.readouterr().err.split("rerun `", 1)[1].split("`", 1)[0]
    words = shlex.split(command)
    assert words[:2] == ["pack_rec", "pack"] and words[-1] == "--resume"
    assert pack_rec(words[1:]) == 0
    assert _files(out) == expected
    assert pack_rec(["verify", "--quiet", str(out)]) == 0


def test_overwrite_in_progress_hides_the_old_manifest(source, tmp_path):
    """Replacing a finished pack: once the new one has started, the old manifest no longer opens (it would
    describe shards being replaced); --resume of the replacement keeps replacing."""
    out = tmp_path / "out"
    pack(source, out / "train", PackOptions(img_fmt=".png", progress=False, skip_bad=True, num_shards=2))
    options = PackOptions(img_fmt=".png", progress=False, skip_bad=True, num_shards=2, quality=80,
                          overwrite=True)
    tracer = _LineTracer()
    reference = tmp_path / "reference"
    assert tracer.run(pack, source, reference / "train", options)
    assert not _LineTracer(_after_first_commit(tracer.where), "kill", out).run(pack, source, out / "train",
                                                                              options)
    with pytest.raises(RecordIOError, match="incomplete pack: 1 of 2 shards"):
        open_dataset(out / "train.manifest.json")
    with pytest.raises(RecordIOError, match="incomplete pack: 1 of 2 shards"):
        open_dataset(out)
    resumed = PackOptions(img_fmt=".png", progress=False, skip_bad=True, num_shards=2, quality=80,
                          resume=True)
    pack(source, out / "train", resumed)
    assert _files(out) == _files(reference)


def test_resume_of_a_finished_pack_changes_nothing(source, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["pack", str(source), "-o", str(out / "train"), "--format", ".png", "--skip-bad", "--quiet"]
    assert pack_rec(args) == 0
    before = _files(out)
    assert pack_rec([*args, "--resume"]) == 0
    assert "nothing to resume: the pack is complete" in capsys.readouterr().out
    assert _files(out) == before
    assert pack_rec([*args, "--resume", "--quality", "80"]) == 2  # another pack: refused, not replaced
    assert "already exists" in capsys.readouterr().err
    assert _files(out) == before


def test_resume_command_sets_every_option_it_was_started_with(tmp_path, monkeypatch):
    """The command in the journal, parsed by `pack_rec`, gives back the same options (plus --resume), with
    absolute paths: it can be pasted from any folder."""
    started = PackOptions(layout="plain", shard_size=7, workers=3, quality=77, img_fmt=".png",
                          resize=(96, 80), pass_through=True, shuffle=True, seed=11, skip_bad=True,
                          list_format="im2rec", root="imgs", landmark_order="xy", progress=False)
    monkeypatch.chdir(tmp_path)
    command = pack_module.resume_command("faces.lst", "out/train", started)
    seen = {}

    def capture(source, prefix, options, _kill_after=None):
        seen.update(source=source, prefix=prefix, options=options)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(pack_module, "pack", capture)
    words = shlex.split(command)
    assert words[:2] == ["pack_rec", "pack"]
    assert pack_rec(words[1:]) == 130
    assert seen["source"] == str(tmp_path / "faces.lst") and seen["prefix"] == str(tmp_path / "out" / "train")
    expected = PackOptions(**{**vars(started), "root": str(tmp_path / "imgs"), "resume": True})
    assert seen["options"] == expected


def test_ctrl_c_prints_the_command_that_finishes_the_pack(source, tmp_path, capsys):
    args = ["pack", str(source), "-o", str(tmp_path / "out" / "train"), "--num-shards", "3", "--format",
            ".png", "--skip-bad", "--quiet"]
    tracer = _LineTracer()
    assert tracer.run(pack_rec, args)
    shutil.rmtree(tmp_path / "out")
    # Ctrl-C while the second shard is written: pack_rec catches it (exit 130) and says how to go on
    assert _LineTracer(_after_first_commit(tracer.where) + 5).run(pack_rec, args)
    err = capsys.readouterr().err
    assert err.startswith("pack_rec pack: interrupted: ") and "incomplete pack: 1 of 3 shards; rerun `" in err
    command = err.split("rerun `", 1)[1].split("`", 1)[0]
    assert pack_rec(shlex.split(command)[1:]) == 0
    assert pack_rec(["verify", "--quiet", str(tmp_path / "out")]) == 0
