"""``pack``: image folders / list files -> RecordIO shards, in parallel, resumable.

Pipeline: the source is scanned into a deterministic *plan* (item order, labels, shard of every item);
a pool of worker processes reads and encodes images (ordered ``imap``) while this process writes them.
Every image record carries its plan position in ``IRHeader.id2``, so after an interruption the open
shard's temporary files tell exactly where to continue: ``--resume`` truncates a torn tail, skips the
items already stored, and goes on. A journal (``<prefix>.pack-journal.json``) records the plan's
fingerprint and finished shards; the manifest is written last and is what marks the pack complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
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
from .shards import LAYOUTS, Manifest, ShardInfo, manifest_path, shard_name
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
    return prefix.with_name(prefix.name + ".pack-journal.json")


def _problems_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".pack-skipped.tsv")


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _read_problems(path: Path) -> dict[int, Problem]:
    found: dict[int, Problem] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3 and parts[0].isdigit():
                found[int(parts[0])] = Problem(parts[1], parts[2])
    return found


# ----------------------------------------------------------------------------------------------- pack
def pack(source: str | os.PathLike, output_prefix: str | os.PathLike, options: PackOptions | None = None,
         _kill_after: int | None = None) -> PackResult:
    """Pack ``source`` into RecordIO shards at ``output_prefix``; return what was written.

    Raises :class:`PackError` for bad inputs (all of them listed) unless ``options.skip_bad``, in which
    case bad inputs are skipped and returned in ``PackResult.problems``.
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

    journal = {"fingerprint": plan.fingerprint, "done": {}}
    if manifest_file.exists() and not options.overwrite:
        raise PackError("a finished pack already exists here (pass --overwrite to replace it)",
                        str(manifest_file))
    resuming = False
    if journal_file.exists():
        try:
            previous = json.loads(journal_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise PackError(f"unreadable pack journal ({error}); delete it to start again",
                            str(journal_file)) from None
        if options.resume:
            if previous.get("fingerprint") != plan.fingerprint:
                raise PackError("cannot resume: the source or the options differ from the interrupted pack "
                                "(same inputs and options are needed; or drop --resume and pass --overwrite)",
                                str(journal_file))
            journal, resuming = previous, True
        elif not options.overwrite:
            raise PackError("an interrupted pack exists for this prefix: pass --resume to continue it, or "
                            "--overwrite to start again", str(journal_file))
    elif options.resume:
        warnings.warn(f"{journal_file}: no interrupted pack to resume; starting from the beginning",
                      stacklevel=2)
    if not resuming:
        _remove_partials(prefix, names, problems_file)
    _write_json_atomic(journal_file, journal)

    problems = _read_problems(problems_file) if resuming else {}
    for problem in source_data.problems:
        problems.setdefault(-1 - len(problems), problem)
    encode_options = EncodeOptions(options.quality, options.img_fmt, options.resize, options.pass_through)
    done_count = sum(info["num_images"] for info in journal["done"].values())
    progress = _progress(len(plan.items), options.progress)
    progress.update(done_count)
    written_total = 0
    try:
        with open(problems_file, "a", encoding="utf-8") as problems_log:
            for shard in range(plan.num_shards):
                if names[shard] in journal["done"]:
                    continue
                info, written = _pack_shard(prefix, names[shard], shard, plan, options, encode_options,
                                            problems, problems_log, progress, _kill_after, written_total)
                written_total += written
                journal["done"][names[shard]] = asdict(info)
                _write_json_atomic(journal_file, journal)
    finally:
        progress.close()

    shard_infos = [ShardInfo(**journal["done"][name]) for name in names]
    image_size = list(options.resize) if options.resize else _probe_image_size(
        [prefix.parent / info.rec for info in shard_infos])
    manifest = Manifest(layout=options.layout, num_classes=plan.num_classes,
                        num_images=sum(info.num_images for info in shard_infos), image_size=image_size,
                        shards=shard_infos, extra={"source": display_path(source), "skipped": len(problems)})
    _write_side_files(prefix, plan, manifest, problems)
    manifest.write(manifest_file)  # last: its presence marks the pack complete
    journal_file.unlink()
    problems_file.unlink(missing_ok=True)
    return PackResult(manifest_file, manifest.num_images, plan.num_classes,
                      [prefix.parent / info.rec for info in shard_infos], list(problems.values()))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="pack", disable=not enabled, smoothing=0.1, dynamic_ncols=True)


def _remove_partials(prefix: Path, names: list[str], problems_file: Path) -> None:
    for name in names:
        for suffix in (".rec.tmp", ".idx.tmp"):
            partial = prefix.with_name(name + suffix)
            if partial.exists():
                partial.unlink()
    problems_file.unlink(missing_ok=True)


def _pack_shard(prefix: Path, name: str, shard: int, plan: _Plan, options: PackOptions,
                encode_options: EncodeOptions, problems: dict[int, Problem], problems_log,
                progress, kill_after: int | None, written_before: int) -> tuple[ShardInfo, int]:
    shard_prefix = prefix.with_name(name)
    class_start, class_end = plan.class_ranges[shard] if options.layout == "insightface" else (0, None)
    num_local = None if class_end is None else class_end - class_start
    partial_rec = shard_prefix.with_name(name + ".rec" + TMP_SUFFIX)
    if options.resume and partial_rec.exists():
        writer = FaceDatasetWriter.resume(shard_prefix, options.layout, class_start, num_local,
                                          overwrite=options.overwrite)
    else:
        writer = FaceDatasetWriter(shard_prefix, options.layout, class_start, num_local,
                                   overwrite=options.overwrite, keep_partial=True)
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
    except BaseException:
        writer.close_partial()
        raise
    writer.close()
    info = ShardInfo(rec=writer.writer.rec_path.name, idx=writer.writer.idx_path.name,
                     num_records=writer.writer.num_records, num_images=writer.num_images,
                     class_start=class_start, num_classes=num_local if num_local is not None else
                     (writer.max_label + 1), sha256=writer.writer.sha256, bytes=writer.writer.position)
    return info, written


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


def _write_side_files(prefix: Path, plan: _Plan, manifest: Manifest, problems: dict[int, Problem]) -> None:
    classes = prefix.with_name(prefix.name + ".classes.tsv")
    _write_text_atomic(classes, "".join(f"{label}\t{name}\n" for label, name in enumerate(plan.class_names)))
    if problems:
        report = prefix.with_name(prefix.name + ".skipped.tsv")
        _write_text_atomic(report, "".join(f"{p.where}\t{p.reason}\n" for p in problems.values()))
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
