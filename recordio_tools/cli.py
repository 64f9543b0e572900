"""``pack_rec``: the RecordIO toolkit command line.

Subcommands: ``pack``, ``info``, ``verify``, ``reindex``, ``unpack``, ``bin``, ``synth``. Every
subcommand that reads a dataset accepts a ``.rec`` path, its prefix, a folder holding ``train.rec``, or
a shard manifest. Data errors are printed as one clear message (file, key, byte offset), never a
traceback. Exit status (as for every console script of the project, :mod:`recordio_tools.cli_style`):
0 done, 1 failed while running (``verify`` found problems, a write failed), 2 bad arguments or input
files, 130 interrupted.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import synth
from .cli_style import EXIT_INTERRUPTED, EXIT_STATUS_HELP, EXIT_USAGE, Parser, os_error_status
from .codec import IR_SIZE, decode_image, encode_image, read_frame, unpack
from .dataset import open_dataset, read_property, resolve_dataset_path
from .errors import RecordIOError, format_location
from .images import contact_sheet, display_path
from .reader import IndexedRecordReader, check_recordio_magic, idx_path_for, next_magic, parse_index
from .shards import file_sha256, incomplete_pack_error, journal_path, read_manifest
from .verification_bin import write_bin


# ----------------------------------------------------------------------------------------------- verify
def verify_rec(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
               num_classes: int | None = None, sha256: str | None = None, check_images: bool = True,
               progress: bool = False) -> list[str]:
    """Check every record of one ``.rec``/``.idx`` pair; return the problems found (empty when sound).

    Checks framing (magic, lengths, cflag sequence, zero padding), ``IRHeader`` sanity, labels (integer,
    within ``num_classes``), image decoding, that every ``.idx`` offset is a record start and every
    record is indexed, the InsightFace header/identity records, and the file checksum when given.
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else idx_path_for(rec_path)
    name = str(rec_path)
    problems: list[str] = []

    def problem(message: str, key: int | None = None, offset: int | None = None) -> None:
        problems.append(format_location(message, name, key, offset))

    if not rec_path.is_file():
        return [format_location("record file not found", name)]
    try:
        check_recordio_magic(rec_path)
    except RecordIOError as error:
        return [str(error)]  # not RecordIO at all: its index and records are beside the point
    size = rec_path.stat().st_size
    if sha256 is not None and file_sha256(rec_path) != sha256:
        problem("checksum (sha256) differs from the manifest: the file changed or is damaged")
    if size == 0:
        return problems + [format_location("record file is empty", name)]
    with open(rec_path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        headers, payload_sizes = _scan_frames(view, mapped, size, problem)
        offset_to_key = _check_index(idx_path, headers, problem, problems)
        if offset_to_key is not None:
            _check_records(view, headers, payload_sizes, offset_to_key, num_classes, check_images,
                           progress, problem)
    finally:
        view.release()
        mapped.close()
    return problems


def _scan_frames(view, mapped, size, problem) -> tuple[dict[int, object], dict[int, int]]:
    """Walk the file frame by frame (resynchronising after damage): record start -> header."""
    headers: dict[int, object] = {}
    payload_sizes: dict[int, int] = {}
    position = 0
    while position < size:
        try:
            payload, end = read_frame(view, position, strict=True)
        except RecordIOError as error:
            problem(error.reason, None, error.offset)
            resync = next_magic(mapped, position + 4)
            if resync < 0:
                break
            position = resync
            continue
        try:
            headers[position] = unpack(payload, "")[0]
        except RecordIOError as error:
            problem(error.reason.lstrip(": "), None, position)
            headers[position] = None
        payload_sizes[position] = len(payload)
        del payload
        position = end
    return headers, payload_sizes


def _check_index(idx_path: Path, headers: dict, problem, problems: list[str]) -> dict[int, int] | None:
    if not idx_path.is_file():
        problem(f"index {idx_path.name} is missing (rebuild it with `pack_rec reindex`)")
        return None
    try:
        keys, offsets = parse_index(idx_path)
    except RecordIOError as error:
        problems.append(str(error))
        return None
    offset_to_key: dict[int, int] = {}
    for key, offset in zip(keys.tolist(), offsets.tolist()):
        if offset not in headers:
            problem(f"{idx_path.name} points here, which is not the start of a record (past the end, inside "
                    f"a record, or at a damaged one)", key, offset)
        else:
            offset_to_key[offset] = key
    for offset in headers:
        if offset not in offset_to_key:
            problem(f"record is not listed in {idx_path.name}", None, offset)
    return offset_to_key


def _check_records(view, headers, payload_sizes, offset_to_key, num_classes, check_images, progress,
                   problem) -> None:
    key_to_offset = {key: offset for offset, key in offset_to_key.items()}
    header_label = None
    if 0 in key_to_offset and headers.get(key_to_offset[0]) is not None:
        header0 = headers[key_to_offset[0]]
        if header0.flag >= 2 and payload_sizes[key_to_offset[0]] == IR_SIZE + 4 * header0.flag:
            first, end = float(header0.label[0]), float(header0.label[1])
            if first == int(first) and end == int(end) and 1 <= first <= end:
                header_label = (int(first), int(end))
            else:
                problem(f"header record label [{first}, {end}] is not a valid key range", 0, key_to_offset[0])
    if header_label is not None:
        first_identity, end_key = header_label
        image_keys = list(range(1, first_identity))
        for key in image_keys + list(range(first_identity, end_key)):
            if key not in key_to_offset:
                problem(f"header record announces key {key}, which is missing", key)
    else:
        image_keys = sorted(key_to_offset)
    labels: dict[int, int] = {}
    iterator = image_keys
    if progress:
        from .progress import progress_bar

        iterator = progress_bar(image_keys, unit="img", desc="verify")
    for key in iterator:
        offset = key_to_offset.get(key)
        header = headers.get(offset) if offset is not None else None
        if header is None:
            continue
        value = float(header.label) if header.flag == 0 else float(header.label[0])
        if not np.isfinite(value) or value < 0 or value != int(value):
            problem(f"label {value!r} is not a non-negative integer", key, offset)
            continue
        if num_classes is not None and value >= num_classes:
            problem(f"label {int(value)} out of range (the dataset has {num_classes} classes)", key, offset)
        labels[key] = int(value)
        if check_images:
            payload, _ = read_frame(view, offset)
            data = unpack(payload, "")[1]
            try:
                decode_image(data, "")
            except RecordIOError:
                problem(f"image does not decode ({len(data)} bytes)", key, offset)
            del payload, data
    if header_label is not None:
        _check_identities(header_label, key_to_offset, headers, labels, problem)


def _check_identities(header_label, key_to_offset, headers, labels, problem) -> None:
    first_identity, end_key = header_label
    expected_start = 1
    class_start = None
    for row, key in enumerate(range(first_identity, end_key)):
        offset = key_to_offset.get(key)
        header = headers.get(offset) if offset is not None else None
        if header is None:
            continue
        if header.flag < 2:
            problem("identity record has no [start, end) label", key, offset)
            continue
        start, end = float(header.label[0]), float(header.label[1])
        if start != int(start) or end != int(end) or not 1 <= start <= end <= first_identity:
            problem(f"identity range [{start}, {end}) is outside the image keys 1..{first_identity - 1}",
                    key, offset)
            continue
        start, end = int(start), int(end)
        if start != expected_start:
            problem(f"identity range [{start}, {end}) does not continue the previous one (expected start "
                    f"{expected_start})", key, offset)
        expected_start = end
        for image_key in range(start, end):
            if image_key not in labels:
                continue
            if class_start is None:
                class_start = labels[image_key] - row
            if labels[image_key] != class_start + row:
                problem(f"image label {labels[image_key]} differs from its identity record's class "
                        f"{class_start + row} (identity record key {key})", image_key,
                        key_to_offset[image_key])
    if expected_start != first_identity:
        problem(f"identity ranges end at key {expected_start}, but images run to key {first_identity - 1}", 0)


def verify_dataset(path: str | os.PathLike, check_images: bool = True, progress: bool = False) -> list[str]:
    """Verify a dataset given any accepted path form (every shard of a manifest, checksums included)."""
    kind, resolved = resolve_dataset_path(path)
    if kind == "rec":
        prop = read_property(resolved.parent)
        return verify_rec(resolved, None, prop[0] if prop else None, None, check_images, progress)
    manifest = read_manifest(resolved)
    problems: list[str] = []
    for info in manifest.shards:
        rec = resolved.parent / info.rec
        problems += verify_rec(rec, resolved.parent / info.idx, manifest.num_classes, info.sha256,
                               check_images, progress)
        if rec.is_file() and (resolved.parent / info.idx).is_file() and not problems:
            reader = IndexedRecordReader(rec, resolved.parent / info.idx)
            if len(reader) != info.num_records:
                problems.append(format_location(
                    f"{len(reader)} records, the manifest says {info.num_records}", str(rec)))
    return problems


# ----------------------------------------------------------------------------------------------- reindex
def reindex(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
            keys: str = "id") -> tuple[Path, int, list[str]]:
    """Rebuild the ``.idx`` of a ``.rec`` by scanning it; return ``(idx_path, records, problems)``.

    Keys come from each record's ``IRHeader.id`` (how MXNet and InsightFace builders set them) or,
    with ``keys="sequential"``, from the record order. Damaged records are skipped and reported. An
    existing index is kept as ``<name>.idx.bak``.
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else idx_path_for(rec_path)
    if not rec_path.is_file():
        raise RecordIOError("record file not found", str(rec_path))
    check_recordio_magic(rec_path)  # an index of a file that is not RecordIO would be empty and misleading
    problems: list[str] = []
    entries: list[tuple[int, int]] = []
    size = rec_path.stat().st_size
    if size:
        with open(rec_path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        position = 0
        while position < size:
            try:
                payload, end = read_frame(view, position, str(rec_path))
                header = unpack(payload, f"{rec_path} at byte {position}")[0]
                del payload
            except RecordIOError as error:
                problems.append(str(error))
                resync = next_magic(mapped, position + 4)
                if resync < 0:
                    break
                position = resync
                continue
            entries.append((header.id if keys == "id" else len(entries), position))
            position = end
        view.release()
        mapped.close()
    if size and not entries:
        raise RecordIOError(f"no readable record in the file ({len(problems)} damaged place(s), first: "
                            f"{problems[0] if problems else 'none'}); no index written", str(rec_path))
    seen: set[int] = set()
    if keys == "id" and any(key in seen or seen.add(key) for key, _ in entries):
        raise RecordIOError("record ids are not unique, so they cannot be the keys; use --keys sequential",
                            str(rec_path))
    if idx_path.exists():
        backup = idx_path.with_name(idx_path.name + ".bak")
        os.replace(idx_path, backup)
    temporary = idx_path.with_name(idx_path.name + ".tmp")
    temporary.write_text("".join(f"{key}\t{offset}\n" for key, offset in entries), encoding="ascii")
    os.replace(temporary, idx_path)
    return idx_path, len(entries), problems


# ----------------------------------------------------------------------------------------------- commands
def _cmd_pack(args: argparse.Namespace) -> int:
    from .pack import PackOptions, pack

    resize = None
    if args.resize:
        parts = [int(value) for value in args.resize.lower().replace("x", ",").split(",")]
        resize = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    options = PackOptions(layout=args.layout, num_shards=args.num_shards, shard_size=args.shard_size,
                          workers=args.workers, quality=args.quality, img_fmt=args.format, resize=resize,
                          pass_through=args.pass_through, shuffle=args.shuffle, seed=args.seed,
                          skip_bad=args.skip_bad, resume=args.resume, overwrite=args.overwrite,
                          list_format=args.list_format, root=args.root, landmark_order=args.landmark_order,
                          progress=not args.quiet)
    try:
        options.validate()
    except ValueError as error:
        raise RecordIOError(str(error)) from None
    kill_after = os.environ.get("PACK_REC_TEST_KILL_AFTER")
    result = pack(args.source, args.output_prefix, options, int(kill_after) if kill_after else None)
    if result.already_complete:
        print(f"nothing to resume: the pack is complete ({result.num_images} images of {result.num_classes} "
              f"identities in {len(result.shards)} shard(s)); manifest {result.manifest}")
        return 0
    print(f"packed {result.num_images} images of {result.num_classes} identities into {len(result.shards)} "
          f"shard(s); manifest {result.manifest}")
    if result.problems:
        print(f"skipped {len(result.problems)} bad input(s):")
        for problem in result.problems:
            print(f"  {problem}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.dataset)
    total_bytes = sum(shard.reader.file_size for shard in dataset.shards)
    records = sum(len(shard.reader) for shard in dataset.shards)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    print(f"dataset      {dataset.source}")
    print(f"layout       {dataset.layout}")
    print(f"shards       {dataset.num_shards}")
    print(f"records      {records}")
    print(f"images       {len(dataset)}")
    print(f"classes      {dataset.num_classes}")
    print(f"image size   {'x'.join(map(str, dataset.image_size)) if dataset.image_size else 'unknown'}")
    print(f"size         {total_bytes / 2**20:.1f} MiB ({total_bytes} bytes)")
    if len(counts):
        print(f"images per identity: min {counts.min()}  median {np.median(counts):g}  "
              f"mean {counts.mean():.2f}  max {counts.max()}  "
              f"(identities without images: {int((counts == 0).sum())})")
    if args.shards:
        for shard, start in zip(dataset.shards, dataset.shard_starts[:-1].tolist()):
            print(f"  {shard.name}: {len(shard.image_keys)} images from index {start}, {shard.layout}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    kind, resolved = resolve_dataset_path(args.dataset)
    if kind == "rec":  # not RecordIO at all is an input error (exit 2), not a damaged dataset (exit 1)
        check_recordio_magic(resolved)
    problems = verify_dataset(args.dataset, check_images=not args.no_images, progress=not args.quiet)
    for message in problems[: args.max_problems]:
        print(message)
    if len(problems) > args.max_problems:
        print(f"... and {len(problems) - args.max_problems} more problems")
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.dataset}", file=sys.stderr)
        return 1
    dataset = open_dataset(args.dataset)  # also proves it loads as a training dataset
    print(f"verify: OK ({len(dataset)} images, {dataset.num_classes} classes, {dataset.num_shards} shard(s))")
    return 0


def _cmd_reindex(args: argparse.Namespace) -> int:
    resolved = Path(args.rec)
    if resolved.suffix != ".rec":
        kind, resolved = resolve_dataset_path(args.rec)
        if kind != "rec":
            raise RecordIOError("reindex needs one .rec file (not a manifest)", str(resolved))
    if not resolved.is_file():
        raise RecordIOError("record file not found", str(resolved))
    idx_path, count, problems = reindex(resolved, args.idx, args.keys)
    for message in problems:
        print(f"skipped damaged data: {message}")
    print(f"wrote {idx_path} ({count} records)")
    return 1 if problems else 0


def _parse_selection(text: str | None, size: int) -> np.ndarray:
    if not text:
        return np.arange(size)
    chosen: list[int] = []
    for part in text.split(","):
        if ":" in part:
            start, _, stop = part.partition(":")
            chosen.extend(range(int(start or 0), min(int(stop or size), size)))
        else:
            chosen.append(int(part))
    return np.array(chosen, dtype=np.int64)


def _extension(data) -> str:
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG"):
        return ".png"
    return ".jpg" if head.startswith(b"\xff\xd8") else ".bin"


def _cmd_unpack(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.dataset)
    indices = _parse_selection(args.indices, len(dataset))
    if args.classes:
        wanted = set(int(value) for value in args.classes.split(","))
        indices = indices[np.isin(dataset.labels[indices], list(wanted))]
    if args.per_class:
        keep, seen = [], {}
        for index in indices.tolist():
            label = dataset.label(index)
            if seen.get(label, 0) < args.per_class:
                seen[label] = seen.get(label, 0) + 1
                keep.append(index)
        indices = np.array(keep, dtype=np.int64)
    indices = indices[: args.limit] if args.limit else indices
    if not args.out and not args.contact_sheet:
        raise RecordIOError("nothing to do: give -o/--output DIR and/or --contact-sheet FILE.png")
    tiles, captions = [], []
    for index in indices.tolist():
        if not 0 <= index < len(dataset):
            raise RecordIOError(f"image index {index} out of range 0..{len(dataset) - 1}", dataset.source)
        data = dataset.read_image(index)
        label = dataset.label(index)
        if args.out:
            folder = Path(args.out) / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index}{_extension(data)}").write_bytes(bytes(data))
        if args.contact_sheet and len(tiles) < args.max_tiles:
            tiles.append(decode_image(data, dataset.describe(index)))
            captions.append(f"id {label}")
    if args.contact_sheet:
        import cv2

        if not tiles:
            raise RecordIOError("no images selected for the contact sheet")
        sheet = contact_sheet(tiles, captions, columns=args.columns)
        path = Path(args.contact_sheet)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), sheet):
            raise RecordIOError("could not write the contact sheet (use a .png name)", str(path))
        print(f"wrote contact sheet {path} ({len(tiles)} faces)")
    if args.out:
        print(f"wrote {len(indices)} images under {args.out}")
    return 0


def read_pairs(pairs_path: str | os.PathLike, root: str | os.PathLike, pairs_format: str = "auto",
               lfw_ext: str = ".jpg") -> tuple[list[tuple[Path, Path]], list[bool]]:
    """Parse an LFW ``pairs.txt`` or a ``path1 path2 same`` list into image path pairs and labels.

    Relative paths (list style) and LFW names (``root/name/name_NNNN.jpg``) are resolved against ``root``;
    ``pack_rec bin`` passes the pairs file's folder unless ``--root`` is given.
    """
    pairs, issame, _ = _read_pairs_lines(pairs_path, root, pairs_format, lfw_ext)
    return pairs, issame


def _read_pairs_lines(pairs_path: str | os.PathLike, root: str | os.PathLike, pairs_format: str = "auto",
                      lfw_ext: str = ".jpg") -> tuple[list[tuple[Path, Path]], list[bool], list[int]]:
    """:func:`read_pairs` plus the line number of every pair (for error messages)."""
    pairs_path, root = Path(pairs_path), Path(root)
    try:
        lines = pairs_path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as error:
        raise RecordIOError(f"cannot read pairs file: {error.strerror or error}", str(pairs_path)) from None
    pairs, issame, numbers = [], [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{pairs_path} line {number}"
        kind = pairs_format
        if kind == "auto":
            if len(fields) <= 2 and all(field.isdigit() for field in fields):
                continue  # LFW header: "10 300" (folds, pairs per fold)
            kind = "lfw" if len(fields) in (3, 4) and fields[-1].isdigit() and fields[1].isdigit() \
                and (len(fields) == 3 or fields[2] and not fields[2].isdigit()) else "list"
        if kind == "lfw":
            if len(fields) <= 2 and all(field.isdigit() for field in fields):
                continue
            try:
                if len(fields) == 3:
                    name, first, second = fields[0], int(fields[1]), int(fields[2])
                    pair = (root / name / f"{name}_{first:04d}{lfw_ext}",
                            root / name / f"{name}_{second:04d}{lfw_ext}")
                    same = True
                elif len(fields) == 4:
                    pair = (root / fields[0] / f"{fields[0]}_{int(fields[1]):04d}{lfw_ext}",
                            root / fields[2] / f"{fields[2]}_{int(fields[3]):04d}{lfw_ext}")
                    same = False
                else:
                    raise ValueError
            except ValueError:
                raise RecordIOError(f"{where}: expected 'name n1 n2' or 'name1 n1 name2 n2'") from None
        else:
            if len(fields) != 3 or fields[2].lower() not in ("1", "0", "true", "false", "same", "diff"):
                raise RecordIOError(f"{where}: expected 'path1 path2 same' with same 1/0, got {line[:80]!r}")
            pair = (root / fields[0], root / fields[1])
            same = fields[2].lower() in ("1", "true", "same")
        pairs.append(pair)
        issame.append(same)
        numbers.append(number)
    if not pairs:
        raise RecordIOError("no pairs found", str(pairs_path))
    return pairs, issame, numbers


def build_bin(pairs_path: str | os.PathLike, output: str | os.PathLike, root: str | os.PathLike | None = None,
              pairs_format: str = "auto", image_size: int | None = 112, quality: int = 95,
              lfw_ext: str = ".jpg") -> tuple[Path, int]:
    """Build a verification pack from a pairs file; images not ``image_size`` square are resized.

    Relative image paths and LFW names are looked up under ``root``, by default the pairs file's own
    folder (as ``pack_rec pack`` does for the paths of a ``.lst``); ``pack_rec synth --pairs`` writes its
    list-style paths relative to that folder, so its pairs file needs no ``--root``.
    """
    looked_in = f"--root {root}" if root is not None else \
        f"the pairs file's folder {Path(pairs_path).parent}; pass --root DIR if the images are elsewhere"
    root = Path(root) if root is not None else Path(pairs_path).parent
    pairs, issame, numbers = _read_pairs_lines(pairs_path, root, pairs_format, lfw_ext)
    cache: dict[Path, bytes] = {}
    bins: list[bytes] = []
    for pair, number in zip(pairs, numbers):
        for path in pair:
            if path not in cache:
                try:
                    original = path.read_bytes()
                except OSError as error:
                    problem = "image not found" if isinstance(error, FileNotFoundError) else \
                        f"cannot read image ({error.strerror or error})"
                    tried = display_path(os.path.abspath(path))
                    raise RecordIOError(f"line {number}: {problem}: looked for {tried} (relative paths and "
                                        f"LFW names are resolved against {looked_in})",
                                        str(pairs_path)) from None
                image = decode_image(original, display_path(path))
                if image_size and image.shape[:2] != (image_size, image_size):
                    import cv2

                    image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
                    original = encode_image(image, quality)
                cache[path] = original
            bins.append(cache[path])
    return write_bin(output, bins, issame), len(issame)


def _cmd_bin(args: argparse.Namespace) -> int:
    path, count = build_bin(args.pairs, args.output, args.root, args.pairs_format,
                            None if args.image_size == 0 else args.image_size, args.quality, args.lfw_ext)
    print(f"wrote {path} ({count} pairs)")
    return 0


# ----------------------------------------------------------------------------------------------- parser
DATASET_HELP = "a .rec file, its prefix (data/train), a folder holding train.rec, or a shard manifest"


def build_parser() -> argparse.ArgumentParser:
    """The ``pack_rec`` argument parser."""
    parser = Parser(prog="pack_rec", description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser,
                                     help="what to do (pack_rec COMMAND --help lists its options)")

    p = commands.add_parser("pack", help="image folder / .lst -> RecordIO shards", epilog=EXIT_STATUS_HELP)
    p.add_argument("source", help="image folder root/<identity>/<image>, an im2rec .lst, or an InsightFace "
                                  "alignment .lst (aligned, path, label, bbox, 5 landmarks)")
    p.add_deprecated_positional("legacy_output_prefix", "OUTPUT_PREFIX", "output_prefix", "-o/--output")
    p.add_output("output prefix, e.g. out/train -> out/train.rec/.idx (or shards) + out/train.manifest.json",
                 dest="output_prefix", metavar="PREFIX")
    p.add_argument("--layout", choices=["insightface", "plain"], default="insightface",
                   help="insightface: header, image and identity records (what InsightFace reads); "
                        "plain: image records only (im2rec style)")
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--num-shards", type=int, default=None, help="number of shard files (default: 1)")
    shards.add_argument("--shard-size", type=int, default=None, help="images per shard (approximate)")
    p.add_argument("--workers", type=int, default=1, help="encoder processes")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--format", choices=[".jpg", ".png"], default=".jpg", help="stored image format")
    p.add_argument("--resize", default=None, help="resize to S or HxW (e.g. 112 or 112x112)")
    p.add_argument("--pass-through", action="store_true",
                   help="store JPEG files that need no resize/alignment byte for byte (no re-encoding)")
    p.add_argument("--shuffle", action="store_true",
                   help="shuffle images (plain layout: globally; insightface layout: within each identity)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--skip-bad", action="store_true", help="skip bad inputs and report them all at the end")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pack")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack at the output prefix")
    p.add_argument("--list-format", choices=["auto", "im2rec", "align"], default="auto",
                   help="how to read a .lst source: im2rec (index, label(s), path), align (InsightFace "
                        "alignment list) or auto (guess from the first lines)")
    p.add_argument("--root", default=None, help="folder .lst paths are relative to (default: the list's "
                                                "folder)")
    p.add_argument("--landmark-order", choices=["x5y5", "xy"], default="x5y5",
                   help="alignment .lst landmark order: x1..x5 y1..y5 (InsightFace) or x1 y1 x2 y2 ...")
    p.add_quiet("no progress bar")
    p.set_defaults(func=_cmd_pack)

    p = commands.add_parser("info", help="records, images, classes, shards, size, images per identity",
                            epilog=EXIT_STATUS_HELP)
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--shards", action="store_true", help="one line per shard")
    p.set_defaults(func=_cmd_info)

    p = commands.add_parser("verify", help="check every record; exit status 1 on any problem",
                            epilog="exit status: 0 no problem found; 1 problems found (listed on stdout); "
                                   "2 bad arguments or no dataset at the path; 130 interrupted")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--no-images", action="store_true", help="skip decoding the images")
    p.add_argument("--max-problems", type=int, default=200, help="print at most this many problems")
    p.add_quiet("no progress bar")
    p.set_defaults(func=_cmd_verify)

    p = commands.add_parser("reindex", help="rebuild a lost or damaged .idx by scanning the .rec",
                            epilog="exit status: 0 index written; 1 index written without damaged records "
                                   "(listed); 2 bad arguments or input file; 130 interrupted")
    p.add_argument("rec", help="the .rec file (or its prefix, or a folder holding train.rec)")
    p.add_output("index to write (default: the .rec's name with .idx, beside it)", dest="idx",
                 required=False, metavar="IDX", old_options=["--idx"])
    p.add_argument("--keys", choices=["id", "sequential"], default="id",
                   help="keys from IRHeader.id (MXNet/InsightFace convention) or record order")
    p.set_defaults(func=_cmd_reindex)

    p = commands.add_parser("unpack", help="records -> image files and/or a contact sheet PNG",
                            epilog=EXIT_STATUS_HELP)
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_output("write the images to OUTPUT/<label>/<index>.jpg (stored bytes, not re-encoded)", dest="out",
                 required=False, metavar="DIR", old_options=["--out"])
    p.add_argument("--contact-sheet", default=None, metavar="PNG",
                   help="also draw a PNG grid of the faces, captioned with their identity")
    p.add_argument("--indices", default=None, help="global image indices, e.g. 0:100,250 (default: all)")
    p.add_argument("--classes", default=None, help="only these comma-separated identity labels")
    p.add_argument("--per-class", type=int, default=0, help="at most this many images per identity (0: all)")
    p.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    p.add_argument("--columns", type=int, default=8, help="faces per row of the contact sheet")
    p.add_argument("--max-tiles", type=int, default=256, help="at most this many faces on the contact sheet")
    p.set_defaults(func=_cmd_unpack)

    p = commands.add_parser("bin", help="pairs file + images -> verification pack (.bin)",
                            description="Build a verification pack (.bin) from a pairs file and its images. "
                                        "Relative paths in the pairs file, and LFW names (ROOT/name/"
                                        "name_NNNN.jpg), are resolved against --root, by default the "
                                        "pairs file's own folder (where `pack_rec synth --pairs` writes "
                                        "list-style paths from).",
                            epilog=EXIT_STATUS_HELP)
    p.add_argument("pairs", help="LFW pairs.txt or lines 'path1 path2 same(1/0)'")
    p.add_deprecated_positional("legacy_output", "OUTPUT", "output", "-o/--output")
    p.add_output("the verification pack to write (.bin)", metavar="BIN")
    p.add_argument("--root", default=None,
                   help="folder that relative image paths and LFW names are resolved against (default: the "
                        "pairs file's folder)")
    p.add_argument("--pairs-format", choices=["auto", "lfw", "list"], default="auto",
                   help="lfw: LFW pairs.txt ('name n1 n2' / 'name1 n1 name2 n2'); list: 'path1 path2 1|0' "
                        "lines; auto: decided per line")
    p.add_argument("--lfw-ext", default=".jpg", help="image extension for LFW-style names")
    p.add_argument("--image-size", type=int, default=112, help="resize images to this square (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of resized images")
    p.set_defaults(func=_cmd_bin)

    synth.add_cli(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pack_rec`` console script; returns the exit status (see :mod:`.cli_style`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RecordIOError, ValueError) as error:  # bad input data or option values
        print(f"pack_rec {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = ""
        if args.command == "pack":
            journal = journal_path(Path(args.output_prefix))
            hint = f": {incomplete_pack_error(journal)}" if journal.is_file() else \
                " (rerun with --resume to continue)"
        print(f"pack_rec {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        print(f"pack_rec {args.command}: error: {display_path(error.filename or '')}: "
              f"{error.strerror or error}", file=sys.stderr)
        return os_error_status(error)


if __name__ == "__main__":
    sys.exit(main())

