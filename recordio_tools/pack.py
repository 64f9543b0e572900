"""``pack``: image folders / list files -> RecordIO shards, in parallel, resumable.

Pipeline: the source is scanned into a deterministic *plan* (item order, labels, shard of every item);
a pool of worker processes reads and encodes images (ordered ``imap``) while this process writes them.
Every image record carries its plan position in ``IRHeader.id2``, so after an interruption the open
shard's temporary files tell exactly where to continue: ``--resume`` truncates a torn tail (and the
closing records of a shard that was being finished), skips the items already stored, and goes on. A
journal (``<prefix>.pack-journal.json``) is written first and removed last; it records the plan's
fingerprint, the finished shards (recorded before they are renamed into place) and the command that
continues the pack. While it exists the prefix is an incomplete pack that no reader opens; the manifest,
written just before the journal is removed, describes the complete pack. An interruption at any point
resumes to the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import signal
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .codec import decode_image, unpack
from .dataset import load_shard
from .errors import ImageError, PackError
from .images import (
    EncodeOptions,
    Problem,
    Source,
    SourceItem,
    display_path,
    encode_source_image,
    read_list,
    scan_folder,
)
from .shards import LAYOUTS, Manifest, ShardInfo, journal_path, manifest_path, read_manifest, shard_name
from .writer import TMP_SUFFIX, FaceDatasetWriter

FLUSH_EVERY = 256  # records between flushes: bounds what an interruption can lose


@dataclass
class PackOptions:
    """Options of ``pack`` (see ``pack_rec pack --help``)."""

    layout: str = "insightface"
    num_shards: int | None = None
    shard_size: int | None = None
    workers: int = 1
    quality: int = 95
    img_fmt: str = ".jpg"
    resize: tuple[int, int] | None = None
    pass_through: bool = False
    shuffle: bool = False
    seed: int = 0
    skip_bad: bool = False
    resume: bool = False
    overwrite: bool = False
    list_format: str = "auto"
    root: str | None = None
    landmark_order: str = "x5y5"
    progress: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad option."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_shards is not None and self.shard_size is not None:
            raise ValueError("--num-shards and --shard-size are mutually exclusive")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"--num-shards must be >= 1, got {self.num_shards}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be 1..100, got {self.quality}")
        if self.img_fmt not in (".jpg", ".png"):
            raise ValueError(f"--format must be .jpg or .png, got {self.img_fmt!r}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ValueError(f"--resize must be a positive size, got {self.resize}")
        if self.landmark_order not in ("x5y5", "xy"):
            raise ValueError(f"--landmark-order must be x5y5 or xy, got {self.landmark_order!r}")


@dataclass
class PackResult:
    """What ``pack`` produced."""

    manifest: Path
    num_images: int
    num_classes: int
    shards: list[Path]
    problems: list[Problem] = field(default_factory=list)
    already_complete: bool = False  # --resume found the pack finished: nothing was written


@dataclass
class _Plan:
    items: list[SourceItem]
    shard_of_item: np.ndarray
    num_shards: int
    class_ranges: list[tuple[int, int]]  # per shard [class_start, class_end) (InsightFace layout)
    num_classes: int
    class_names: list[str]
    fingerprint: str


def load_source(source: str | os.PathLike, options: PackOptions) -> Source:
    """Scan a folder tree or parse a list file."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source)
    if source.is_file():
        return read_list(source, options.root, options.list_format, options.landmark_order)
    raise PackError("source not found: expected an image folder (root/<identity>/<image>) or a .lst file",
                    display_path(source))


def make_plan(source: Source, options: PackOptions) -> _Plan:
    """Deterministic item order and shard assignment (identical on every run with the same inputs)."""
    rng = np.random.default_rng(options.seed)
    labels = np.array([item.label for item in source.items], dtype=np.int64)
    if options.layout == "insightface":
        # Images of an identity must be contiguous: order by label; shuffling only permutes images
        # inside each identity.
        tiebreak = rng.permutation(len(labels)) if options.shuffle else np.arange(len(labels))
        order = np.lexsort((tiebreak, labels))
    else:
        order = rng.permutation(len(labels)) if options.shuffle else np.arange(len(labels))
    items = [source.items[index] for index in order.tolist()]
    labels = labels[order]
    count = len(items)
    wanted = options.num_shards or (math.ceil(count / options.shard_size) if options.shard_size else 1)
    wanted = max(1, min(wanted, count))
    class_ranges: list[tuple[int, int]] = []
    if options.layout == "insightface":
        class_counts = np.bincount(labels, minlength=source.num_classes)
        class_first = np.concatenate([[0], np.cumsum(class_counts)[:-1]])
        # Split at identity boundaries, close to equal image counts; classes are never cut in two.
        # (by the position of each class's middle image, which balances shards better than its first).
        shard_of_class = np.minimum((2 * class_first + class_counts) * wanted // (2 * count), wanted - 1)
        _, shard_of_class = np.unique(shard_of_class, return_inverse=True)
        num_shards = int(shard_of_class.max()) + 1
        shard_of_item = shard_of_class[labels]
        for shard in range(num_shards):
            classes = np.flatnonzero(shard_of_class == shard)
            class_ranges.append((int(classes[0]), int(classes[-1]) + 1))
    else:
        num_shards = wanted
        shard_of_item = np.arange(count, dtype=np.int64) * num_shards // count
    digest = hashlib.sha256()
    digest.update(json.dumps({"layout": options.layout, "quality": options.quality, "fmt": options.img_fmt,
                              "resize": options.resize, "pass_through": options.pass_through,
                              "num_shards": num_shards, "classes": source.num_classes}).encode())
    for item, shard in zip(items, shard_of_item.tolist()):
        digest.update(f"{display_path(item.path)}\t{item.label}\t{shard}\n".encode())
    return _Plan(items, shard_of_item.astype(np.int64), num_shards, class_ranges, source.num_classes,
                 source.class_names, digest.hexdigest())


# ----------------------------------------------------------------------------------------------- workers
_WORKER_OPTIONS: EncodeOptions | None = None


def _init_worker(options: EncodeOptions) -> None:
    global _WORKER_OPTIONS
    _WORKER_OPTIONS = options
    # Ctrl-C goes to the parent, which terminates the pool; workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_task(task: tuple[int, SourceItem]) -> tuple[int, bytes | None, str | None]:
    index, item = task
    try:
        return index, encode_source_image(item, _WORKER_OPTIONS), None
    except ImageError as error:
        return index, None, error.reason if error.path else str(error)


def _encoded_stream(tasks: list[tuple[int, SourceItem]], options: EncodeOptions,
                    workers: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    if workers == 1 or len(tasks) < 2:
        _init_worker_options_inline(options)
        for task in tasks:
            yield _encode_task(task)
        return
    # Ordered imap: the writer receives items in plan order while workers encode ahead of it.
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    pool = context.Pool(workers, initializer=_init_worker, initargs=(options,))
    try:
        yield from pool.imap(_encode_task, tasks, chunksize=chunk)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _init_worker_options_inline(options: EncodeOptions) -> None:
    global _WORKER_OPTIONS
    _WORKER_OPTIONS = options


# ----------------------------------------------------------------------------------------------- journal
def _journal_path(prefix: Path) -> Path:
    return journal_path(prefix)


def _problems_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".pack-skipped.tsv")


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _read_problems(path: Path) -> dict[int, Problem]:
    """Bad images logged by an interrupted run (plan index -> problem); a torn last line is dropped from
    the file too, so that new lines append after whole ones."""
    found: dict[int, Problem] = {}
    if not path.exists():
        return found
    raw = path.read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    if len(whole) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(whole))
    for line in whole.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[0].isdigit():
            found[int(parts[0])] = Problem(parts[1], parts[2])
    return found


# Options of PackOptions -> the `pack_rec pack` flag that sets them (resume/overwrite are added as needed).
_CLI_FLAGS = (("layout", "--layout"), ("num_shards", "--num-shards"), ("shard_size", "--shard-size"),
              ("workers", "--workers"), ("quality", "--quality"), ("img_fmt", "--format"),
              ("resize", "--resize"), ("pass_through", "--pass-through"), ("shuffle", "--shuffle"),
              ("seed", "--seed"), ("skip_bad", "--skip-bad"), ("list_format", "--list-format"),
              ("root", "--root"), ("landmark_order", "--landmark-order"))


def resume_command(source: str | os.PathLike, output_prefix: str | os.PathLike, options: PackOptions) -> str:
    """The ``pack_rec pack ... --resume`` command line that continues this pack from any folder (absolute
    paths, every option that differs from its default)."""
    defaults = PackOptions()
    words = ["pack_rec", "pack", os.path.abspath(source), "-o", os.path.abspath(output_prefix)]
    for name, flag in _CLI_FLAGS:
        value = getattr(options, name)
        if value == getattr(defaults, name) or value is None:
            continue
        if isinstance(value, bool):
            words.append(flag)
        elif name == "resize":
            words += [flag, f"{value[0]}x{value[1]}"]
        elif name == "root":
            words += [flag, os.path.abspath(value)]
        else:
            words += [flag, str(value)]
    if not options.progress:
        words.append("--quiet")
    return shlex.join([*words, "--resume"])


def _remove_stale_temporaries(prefix: Path) -> None:
    """Temporary files of atomic writes (``.<name>.tmp-<pid>``) that an interruption left behind."""
    names = [_journal_path(prefix).name, manifest_path(prefix).name, prefix.name + ".classes.tsv",
             prefix.name + ".skipped.tsv", "property"]
    for name in names:
        for stale in prefix.parent.glob(f".{glob.escape(name)}.tmp-*"):
            stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- pack
def pack(source: str | os.PathLike, output_prefix: str | os.PathLike, options: PackOptions | None = None,
         _kill_after: int | None = None) -> PackResult:
    """Pack ``source`` into RecordIO shards at ``output_prefix``; return what was written.

    Raises :class:`PackError` for bad inputs (all of them listed) unless ``options.skip_bad``, in which
    case bad inputs are skipped and returned in ``PackResult.problems``.

    Order of work, so that an interruption anywhere resumes (``options.resume``) to the same bytes: the
    journal is written before anything else (from then on every way of opening the prefix refuses: an
    incomplete pack); each shard is finished under its temporary names, recorded in the journal, then
    renamed; the side files and the manifest come after the last shard, and removing the journal is
    the last step.
    """
    options = options or PackOptions()
    options.validate()
    prefix = Path(output_prefix)
    if prefix.name in ("", ".") or prefix.is_dir():
        raise PackError("OUTPUT_PREFIX must name files, e.g. out/train (it is a folder)", str(prefix))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    manifest_file = manifest_path(prefix)
    journal_file, problems_file = _journal_path(prefix), _problems_path(prefix)

    source_data = load_source(source, options)
    if source_data.problems and not options.skip_bad:
        raise PackError(_problem_report(source_data.problems, "bad inputs found while scanning"),
                        display_path(source))
    plan = make_plan(source_data, options)
    names = [shard_name(prefix.name, index, plan.num_shards) for index in range(plan.num_shards)]
    command = resume_command(source, prefix, options)

    previous = None
    if journal_file.exists():
        try:
            previous = json.loads(journal_file.read_text(encoding="utf-8"))
            if not isinstance(previous, dict) or not isinstance(previous.get("done"), dict):
                raise ValueError("not a pack journal")
        except (OSError, ValueError) as error:
            raise PackError(f"unreadable pack journal ({error}); delete it to start again",
                            str(journal_file)) from None
        if options.resume and previous.get("fingerprint") != plan.fingerprint:
            raise PackError("cannot resume: the source or the options differ from the interrupted pack "
                            "(same inputs and options are needed; or drop --resume and pass --overwrite)",
                            str(journal_file))
        if not options.resume and not options.overwrite:
            # the command it was started with (this one may differ in more than --resume)
            started = previous.get("command") or command
            raise PackError(f"an interrupted pack exists for this prefix: continue it with `{started}`, or "
                            f"pass --overwrite to start again", str(journal_file))
    resuming = previous is not None and options.resume
    if resuming:
        journal = previous
        journal["command"] = command
    else:
        if manifest_file.exists() and not options.overwrite:
            if options.resume and _manifest_fingerprint(manifest_file) == plan.fingerprint:
                return _already_complete(manifest_file, prefix, problems_file)
            raise PackError("a finished pack already exists here (pass --overwrite to replace it)",
                            str(manifest_file))
        if options.resume:
            warnings.warn(f"{journal_file}: no interrupted pack to resume; starting from the beginning",
                          stacklevel=2)
        journal = {"fingerprint": plan.fingerprint, "num_shards": plan.num_shards, "shards": names,
                   "command": command, "overwrite": options.overwrite, "done": {}}
        _remove_partials(prefix, names, problems_file)
    _remove_stale_temporaries(prefix)
    _write_json_atomic(journal_file, journal)
    # A manifest from before (a pack being replaced, or this one's, written just before an interruption)
    # must not describe the files while they change; the finished pack writes it again.
    manifest_file.unlink(missing_ok=True)
    overwrite = options.overwrite or bool(journal.get("overwrite"))

    # Bad images of finished shards are in the journal, those of the shard that was open in the log.
    image_problems = {int(index): Problem(*problem) for index, problem in journal.get("skipped", {}).items()}
    if resuming:
        for index, problem in _read_problems(problems_file).items():
            image_problems.setdefault(index, problem)
    encode_options = EncodeOptions(options.quality, options.img_fmt, options.resize, options.pass_through)
    done_count = sum(info["num_images"] for info in journal["done"].values())
    progress = _progress(len(plan.items), options.progress)
    progress.update(done_count)
    written_total = 0
    try:
        with open(problems_file, "a", encoding="utf-8") as problems_log:
            for shard in range(plan.num_shards):
                if names[shard] in journal["done"]:
                    _commit_recorded_shard(prefix, journal["done"][names[shard]])
                    continue
                writer, info, written = _pack_shard(prefix, names[shard], shard, plan, options, resuming,
                                                    overwrite, encode_options, image_problems, problems_log,
                                                    progress, _kill_after, written_total)
                written_total += written
                journal["done"][names[shard]] = asdict(info)
                journal["skipped"] = {str(index): [problem.where, problem.reason]
                                      for index, problem in sorted(image_problems.items())}
                _write_json_atomic(journal_file, journal)  # recorded first, then given its final names
                writer.commit()
    finally:
        progress.close()

    shard_infos = [ShardInfo(**journal["done"][name]) for name in names]
    image_size = list(options.resize) if options.resize else _probe_image_size(
        [prefix.parent / info.rec for info in shard_infos])
    # Source problems first (scan order), then bad images in plan order: the same list whichever runs
    # met them.
    problems = list(source_data.problems) + [image_problems[index] for index in sorted(image_problems)]
    manifest = Manifest(layout=options.layout, num_classes=plan.num_classes,
                        num_images=sum(info.num_images for info in shard_infos), image_size=image_size,
                        shards=shard_infos, extra={"source": display_path(source), "skipped": len(problems),
                                                   "fingerprint": plan.fingerprint})
    _write_side_files(prefix, plan, manifest, problems)
    manifest.write(manifest_file)
    problems_file.unlink(missing_ok=True)  # its lines are in the journal by now
    journal_file.unlink()  # last: from here on the pack is complete
    return PackResult(manifest_file, manifest.num_images, plan.num_classes,
                      [prefix.parent / info.rec for info in shard_infos], problems)


def _manifest_fingerprint(manifest_file: Path) -> str | None:
    try:
        extra = json.loads(manifest_file.read_text(encoding="utf-8")).get("extra") or {}
        return extra.get("fingerprint") if isinstance(extra, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def _already_complete(manifest_file: Path, prefix: Path, problems_file: Path) -> PackResult:
    """``--resume`` of a pack that finished (interrupted after its journal was removed): tidy up only."""
    problems_file.unlink(missing_ok=True)
    _remove_stale_temporaries(prefix)
    manifest = read_manifest(manifest_file)
    return PackResult(manifest_file, manifest.num_images, manifest.num_classes,
                      [prefix.parent / info.rec for info in manifest.shards], [], already_complete=True)


def _commit_recorded_shard(prefix: Path, info: dict) -> None:
    """Give a shard the journal records as finished its final names, if an interruption came first."""
    for key in ("rec", "idx"):
        final = prefix.with_name(info[key])
        temporary = final.with_name(final.name + TMP_SUFFIX)
        if temporary.exists():
            os.replace(temporary, final)
        if not final.is_file():
            raise PackError("a shard the pack journal records as finished is missing (moved or deleted?); "
                            "pass --overwrite instead of --resume to pack again", str(final))
    rec = prefix.with_name(info["rec"])
    if rec.stat().st_size != info["bytes"]:
        raise PackError(f"a finished shard has {rec.stat().st_size} bytes, the pack journal says "
                        f"{info['bytes']} (changed since?); pass --overwrite instead of --resume to pack "
                        f"again", str(rec))


def _progress(total: int, enabled: bool):
    from .progress import progress_bar

    return progress_bar(total=total, unit="img", desc="pack", disable=not enabled, smoothing=0.1)


def _remove_partials(prefix: Path, names: list[str], problems_file: Path) -> None:
    for name in names:
        for suffix in (".rec.tmp", ".idx.tmp"):
            partial = prefix.with_name(name + suffix)
            if partial.exists():
                partial.unlink()
    problems_file.unlink(missing_ok=True)


def _pack_shard(prefix: Path, name: str, shard: int, plan: _Plan, options: PackOptions, resuming: bool,
                overwrite: bool, encode_options: EncodeOptions, problems: dict[int, Problem], problems_log,
                progress, kill_after: int | None,
                written_before: int) -> tuple[FaceDatasetWriter, ShardInfo, int]:
    """Write shard ``shard`` (continuing its temporary files when resuming) and finish it under its
    temporary names; the caller records it and then commits it."""
    shard_prefix = prefix.with_name(name)
    class_start, class_end = plan.class_ranges[shard] if options.layout == "insightface" else (0, None)
    num_local = None if class_end is None else class_end - class_start
    partial_rec = shard_prefix.with_name(name + ".rec" + TMP_SUFFIX)
    if resuming and partial_rec.exists():
        writer = FaceDatasetWriter.resume(shard_prefix, options.layout, class_start, num_local,
                                          overwrite=overwrite)
    else:
        writer = FaceDatasetWriter(shard_prefix, options.layout, class_start, num_local,
                                   overwrite=overwrite, keep_partial=True)
    members = np.flatnonzero(plan.shard_of_item == shard)
    # Items up to the last stored one are done; bad items among them were logged when first met.
    todo = [(int(index), plan.items[index]) for index in members.tolist() if index > writer.last_source_index]
    progress.update(len(members) - len(todo))
    written = 0
    try:
        for index, encoded, reason in _encoded_stream(todo, encode_options, options.workers):
            item = plan.items[index]
            if encoded is None:
                problem = Problem(display_path(item.path), reason or "unreadable image")
                if not options.skip_bad:
                    raise PackError(f"{problem.reason} (pass --skip-bad to skip bad images and list them "
                                    f"at the end; rerun with --resume after fixing it)", problem.where)
                if index not in problems:
                    problems[index] = problem
                    problems_log.write(f"{index}\t{problem.where}\t{problem.reason}\n")
                    problems_log.flush()
            else:
                writer.add(item.label, encoded, source_index=index)
                written += 1
                if written % FLUSH_EVERY == 0:
                    writer.writer.flush()
                if kill_after is not None and written_before + written >= kill_after:
                    # Test hook: die like a killed process would (no cleanup, no flush).
                    os.kill(os.getpid(), signal.SIGKILL)
            progress.update(1)
        writer.finish()
    except BaseException:
        writer.close_partial()
        raise
    info = ShardInfo(rec=writer.writer.rec_path.name, idx=writer.writer.idx_path.name,
                     num_records=writer.writer.num_records, num_images=writer.num_images,
                     class_start=class_start, num_classes=num_local if num_local is not None else
                     (writer.max_label + 1), sha256=writer.writer.sha256, bytes=writer.writer.position)
    return writer, info, written


def _probe_image_size(rec_paths: list[Path]) -> list[int] | None:
    """Height and width of the first stored image (all images of a pack share it unless not resized)."""
    for rec_path in rec_paths:
        shard = load_shard(rec_path)
        if len(shard.image_keys):
            _, data = unpack(shard.reader.read_at(int(shard.image_offsets[0])))
            image = decode_image(data, str(rec_path))
            shard.reader.close()
            return [int(image.shape[0]), int(image.shape[1])]
    return None


def _write_side_files(prefix: Path, plan: _Plan, manifest: Manifest, problems: list[Problem]) -> None:
    classes = prefix.with_name(prefix.name + ".classes.tsv")
    _write_text_atomic(classes, "".join(f"{label}\t{name}\n" for label, name in enumerate(plan.class_names)))
    if problems:
        report = prefix.with_name(prefix.name + ".skipped.tsv")
        _write_text_atomic(report, "".join(f"{p.where}\t{p.reason}\n" for p in problems))
    if manifest.layout == "insightface" and manifest.image_size:
        prop = prefix.parent / "property"
        text = f"{manifest.num_classes},{manifest.image_size[0]},{manifest.image_size[1]}"
        if prop.exists() and prop.read_text(encoding="utf-8", errors="replace").strip() != text:
            warnings.warn(f"{prop} exists with other content; left as is (the manifest holds the class "
                          f"count)", stacklevel=3)
        else:
            _write_text_atomic(prop, text)


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8", errors="backslashreplace")
    os.replace(temporary, path)


def _problem_report(problems: list[Problem], title: str, limit: int = 20) -> str:
    lines = [f"{title} ({len(problems)}; pass --skip-bad to skip them):"]
    lines += [f"  {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
