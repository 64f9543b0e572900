"""Sharded datasets: ``<prefix>-00000-of-00008.rec/.idx`` pairs plus a small JSON manifest.

Each shard is a stand-alone MXNet RecordIO file (its own header record and identity records in the
InsightFace layout, image labels global), so MXNet-based tools can open any one shard. The manifest
(``<prefix>.manifest.json``) is written last and the pack's journal (``<prefix>.pack-journal.json``)
removed after it: a pack is complete when its manifest is there and its journal is not. While the journal
is there, every way of opening the pack refuses (:func:`refuse_if_incomplete`), naming the command that
finishes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import RecordIOError

MANIFEST_FORMAT = "arcface-recordio-shards"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
JOURNAL_SUFFIX = ".pack-journal.json"
LAYOUTS = ("insightface", "plain")


def shard_name(prefix_name: str, index: int, count: int) -> str:
    """File stem of shard ``index`` of ``count`` (``train`` when there is a single shard)."""
    if count == 1:
        return prefix_name
    return f"{prefix_name}-{index:05d}-of-{count:05d}"


def manifest_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.manifest.json``."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + MANIFEST_SUFFIX)


def journal_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.pack-journal.json``: present while a pack at ``prefix`` is unfinished."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + JOURNAL_SUFFIX)


def _journal_prefix(journal: Path) -> Path:
    return journal.with_name(journal.name[: -len(JOURNAL_SUFFIX)])


def _belongs_to(stem: str, prefix_name: str, journal: Path) -> bool:
    """Whether a ``.rec`` named ``stem`` is (or will be) one of the shards of the pack at ``prefix_name``."""
    if stem == prefix_name or re.fullmatch(re.escape(prefix_name) + r"-\d{5}-of-\d{5}", stem):
        return True
    try:
        names = json.loads(journal.read_text(encoding="utf-8")).get("shards") or []
    except (OSError, ValueError, AttributeError):
        names = []
    return stem in names


def pack_journal_of(path: str | os.PathLike) -> Path | None:
    """The journal of the unfinished pack that ``path`` belongs to, if any.

    ``path`` may be a manifest, a ``.rec``/``.idx`` (one of the pack's shards), a prefix, or a folder
    (any unfinished pack in it).
    """
    path = Path(path)
    name = path.name
    if path.is_dir():
        journals = sorted(path.glob("*" + JOURNAL_SUFFIX))
        return journals[0] if journals else None
    if name.endswith(MANIFEST_SUFFIX):
        journal = journal_path(path.with_name(name[: -len(MANIFEST_SUFFIX)]))
        return journal if journal.is_file() else None
    if path.suffix in (".rec", ".idx"):
        for journal in sorted(path.parent.glob("*" + JOURNAL_SUFFIX)):
            if _belongs_to(path.stem, _journal_prefix(journal).name, journal):
                return journal
        return None
    journal = journal_path(path)
    return journal if journal.is_file() else None


def incomplete_pack_error(journal: str | os.PathLike) -> RecordIOError:
    """``<prefix>: incomplete pack: k of n shards; rerun `pack_rec pack ... --resume```, from the journal."""
    journal = Path(journal)
    prefix = _journal_prefix(journal)
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError
    except (OSError, ValueError):
        data = {}
    done = len(data.get("done") or {})
    total = data.get("num_shards")
    command = data.get("command")
    count = f"{done} of {total} shards" if isinstance(total, int) else f"{done} shard(s) finished"
    rerun = f"rerun `{command}` to finish it" if command else \
        f"rerun `pack_rec pack SOURCE -o {prefix} --resume` with the options it was started with"
    return RecordIOError(f"incomplete pack: {count}; {rerun} (its journal {journal.name} is beside it; "
                         f"until then this is not a dataset)", str(prefix))


def refuse_if_incomplete(path: str | os.PathLike) -> None:
    """Raise :func:`incomplete_pack_error` when ``path`` belongs to an unfinished pack."""
    journal = pack_journal_of(path)
    if journal is not None:
        raise incomplete_pack_error(journal)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    """One shard as recorded in the manifest (paths relative to the manifest's folder)."""

    rec: str
    idx: str
    num_records: int
    num_images: int
    class_start: int
    num_classes: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """The manifest of a (possibly single-shard) dataset."""

    layout: str
    num_classes: int
    num_images: int
    image_size: list[int] | None
    shards: list[ShardInfo]
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """Pretty JSON text."""
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary name, fsync, rename)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return path


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Load and validate a manifest; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RecordIOError(f"cannot read manifest: {error.strerror or error}", str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordIOError(f"manifest is not valid JSON: {error}", str(path)) from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise RecordIOError(f"not a shard manifest (key 'format' must be {MANIFEST_FORMAT!r})", str(path))
    if raw.get("version") != MANIFEST_VERSION:
        raise RecordIOError(f"unsupported manifest version {raw.get('version')!r} (key 'version')", str(path))
    try:
        shards = [ShardInfo(**shard) for shard in raw["shards"]]
        manifest = Manifest(layout=raw["layout"], num_classes=int(raw["num_classes"]),
                            num_images=int(raw["num_images"]), image_size=raw.get("image_size"),
                            shards=shards, extra=raw.get("extra", {}))
    except KeyError as error:
        raise RecordIOError(f"manifest lacks key {error}", str(path)) from None
    except TypeError as error:
        raise RecordIOError(f"manifest key 'shards' has a malformed entry ({error})", str(path)) from None
    if manifest.layout not in LAYOUTS:
        raise RecordIOError(f"key 'layout' must be one of {LAYOUTS}, got {manifest.layout!r}", str(path))
    if not manifest.shards:
        raise RecordIOError("key 'shards' is empty", str(path))
    if sum(shard.num_images for shard in shards) != manifest.num_images:
        raise RecordIOError("key 'num_images' differs from the sum over 'shards'", str(path))
    return manifest
