"""Sharded datasets: ``<prefix>-00000-of-00008.rec/.idx`` pairs plus a small JSON manifest.

Each shard is a stand-alone MXNet RecordIO file (its own header record and identity records in the
InsightFace layout, image labels global), so MXNet-based tools can open any one shard. The manifest
(``<prefix>.manifest.json``) is written last: its presence is what marks a pack complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import RecordIOError

MANIFEST_FORMAT = "arcface-recordio-shards"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
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
