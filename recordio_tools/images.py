"""Pack sources (image folder trees, ``im2rec`` and InsightFace alignment ``.lst`` files), per-image
encoding for ``pack``, and the contact sheet drawn by ``unpack``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .align import align_face
from .codec import decode_image, encode_image
from .errors import ImageError, PackError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class SourceItem:
    """One image to pack: its file, identity label, and (alignment lists) 5 landmarks."""

    path: str
    label: int
    landmarks: np.ndarray | None = None  # (5, 2) x, y in source pixels
    aligned: bool = True


@dataclass
class Problem:
    """A bad input found while scanning or encoding (reported all together at the end)."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Source:
    """Everything ``pack`` needs from its input: items, class count and names, problems found."""

    kind: str
    items: list[SourceItem]
    num_classes: int
    class_names: list[str]
    problems: list[Problem]


def display_path(path: str | os.PathLike) -> str:
    """A printable path even when the name is not valid UTF-8 (undecodable bytes shown escaped)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def scan_folder(root: str | os.PathLike) -> Source:
    """``root/<identity>/<image>``: identities in sorted name order get labels ``0..K-1``.

    Hidden files are ignored; non-image files, files directly under ``root``, empty identity folders
    and unreadable folders are problems.
    """
    root = Path(root)
    problems: list[Problem] = []
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as error:
        raise PackError(f"cannot list source folder: {error.strerror or error}", display_path(root)) from None
    items: list[SourceItem] = []
    class_names: list[str] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            problems.append(Problem(display_path(entry.path), "file directly under the source root (expected "
                                    "root/<identity>/<image>)"))
            continue
        try:
            files = sorted((child for child in os.scandir(entry.path) if not child.name.startswith(".")),
                           key=lambda child: child.name)
        except OSError as error:
            problems.append(Problem(display_path(entry.path), f"unreadable identity folder: "
                                    f"{error.strerror or error}"))
            continue
        images = []
        for child in files:
            if child.is_dir():
                problems.append(Problem(display_path(child.path), "nested folder inside an identity folder"))
            elif Path(child.name).suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(Problem(display_path(child.path), "not an image file (extension "
                                        f"{Path(child.name).suffix or 'none'!r})"))
            else:
                images.append(child.path)
        if not images:
            problems.append(Problem(display_path(entry.path), "empty identity folder (no images)"))
            continue
        label = len(class_names)
        class_names.append(entry.name)
        items.extend(SourceItem(path, label) for path in images)
    if not items:
        raise PackError("no images found (expected root/<identity>/<image files>)", display_path(root))
    return Source("folder", items, len(class_names), class_names, problems)


def _float_fields(fields: list[str]) -> bool:
    try:
        [float(field) for field in fields]
    except ValueError:
        return False
    return True


def detect_list_format(list_path: str | os.PathLike) -> str:
    """``"im2rec"`` (``index, label..., path``) or ``"align"`` (``aligned, path, label[, bbox, lmk]``)."""
    with open(list_path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 3:
                continue
            if _float_fields(fields[:-1]) and not _float_fields(fields[-1:]):
                return "im2rec"
            if fields[0] in ("0", "1") and len(fields) in (3, 7, 17) and _float_fields(fields[2:]):
                return "align"
            break
    raise PackError("cannot tell the list format from its first line (use --list-format im2rec|align)",
                    display_path(list_path))


def read_list(list_path: str | os.PathLike, root: str | os.PathLike | None = None, list_format: str = "auto",
              landmark_order: str = "x5y5") -> Source:
    """Parse an ``im2rec`` or InsightFace alignment ``.lst``; relative paths are resolved from ``root``.

    Alignment lists hold 4 bbox values then 10 landmark values, by default all five x then all five y
    (InsightFace's order; ``landmark_order="xy"`` reads x1 y1 x2 y2 ...). Bad lines are problems.
    """
    list_path = Path(list_path)
    root = Path(root) if root is not None else list_path.parent
    if list_format == "auto":
        list_format = detect_list_format(list_path)
    if list_format not in ("im2rec", "align"):
        raise PackError(f"--list-format must be auto, im2rec or align, got {list_format!r}", str(list_path))
    items: list[SourceItem] = []
    problems: list[Problem] = []
    try:
        handle = open(list_path, encoding="utf-8", errors="surrogateescape")
    except OSError as error:
        raise PackError(f"cannot read list file: {error.strerror or error}",
                        display_path(list_path)) from None
    with handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{display_path(list_path)} line {number}"
            fields = line.split("\t")
            try:
                items.append(_parse_list_fields(fields, list_format, root, landmark_order))
            except ValueError as error:
                problems.append(Problem(where, str(error)))
    if not items:
        raise PackError("no usable lines in the list file", display_path(list_path))
    num_classes = max(item.label for item in items) + 1
    return Source(list_format, items, num_classes, [str(label) for label in range(num_classes)], problems)


def _parse_list_fields(fields: list[str], list_format: str, root: Path, landmark_order: str) -> SourceItem:
    if list_format == "im2rec":
        if len(fields) < 3:
            raise ValueError(f"expected 'index<TAB>label[<TAB>label...]<TAB>path', got {len(fields)} fields")
        label_text, path = fields[1], fields[-1]
        landmarks, aligned = None, True
    else:
        if len(fields) not in (3, 7, 17):
            raise ValueError(f"expected 'aligned<TAB>path<TAB>label[<TAB>4 bbox<TAB>10 landmarks]' "
                             f"(3, 7 or 17 fields), got {len(fields)}")
        if fields[0] not in ("0", "1"):
            raise ValueError(f"first field (aligned) must be 0 or 1, got {fields[0]!r}")
        aligned = fields[0] == "1"
        path, label_text = fields[1], fields[2]
        landmarks = None
        if len(fields) == 17:
            try:
                values = np.array([float(value) for value in fields[7:17]], dtype=np.float32)
            except ValueError:
                raise ValueError("landmark values must be numbers") from None
            landmarks = values.reshape(2, 5).T.copy() if landmark_order == "x5y5" else values.reshape(5, 2)
            if not np.all(np.isfinite(landmarks)):
                raise ValueError("landmark values must be finite")
        elif not aligned:
            raise ValueError("unaligned row (aligned=0) without 5 landmarks: cannot align it")
    try:
        label_value = float(label_text)
    except ValueError:
        raise ValueError(f"label {label_text!r} is not a number") from None
    if not np.isfinite(label_value) or label_value < 0 or label_value != int(label_value):
        raise ValueError(f"label {label_text!r} is not a non-negative integer")
    if not path:
        raise ValueError("empty image path")
    full = Path(path) if os.path.isabs(path) else root / path
    return SourceItem(str(full), int(label_value), landmarks, aligned)


# ----------------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodeOptions:
    """How ``pack`` turns a source file into stored bytes."""

    quality: int = 95
    img_fmt: str = ".jpg"
    resize: tuple[int, int] | None = None  # (height, width)
    pass_through: bool = False
    align_size: int = 112


def encode_source_image(item: SourceItem, options: EncodeOptions) -> bytes:
    """Read, check, optionally align/resize, and encode one source image; :class:`ImageError` on failure."""
    where = display_path(item.path)
    try:
        with open(item.path, "rb") as handle:
            original = handle.read()
    except OSError as error:
        raise ImageError(f"unreadable image file: {error.strerror or error}", where) from None
    image = decode_image(np.frombuffer(original, dtype=np.uint8), where)
    changed = False
    if item.landmarks is not None and not item.aligned:
        try:
            image = align_face(image, item.landmarks)
        except ValueError as error:
            raise ImageError(f"cannot align with its landmarks: {error}", where) from None
        changed = True
    if options.resize is not None and image.shape[:2] != tuple(options.resize):
        height, width = options.resize
        # INTER_AREA when shrinking avoids aliasing; linear when enlarging.
        shrinking = height * width < image.shape[0] * image.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (width, height), interpolation=interpolation)
        changed = True
    if options.pass_through and not changed and original[:2] == b"\xff\xd8":
        return original  # already the right size and JPEG: keep the exact bytes (no re-encoding loss)
    return encode_image(image, options.quality, options.img_fmt)


# ------------------------------------------------------------------------------------------ contact sheet
def contact_sheet(images_bgr: list[np.ndarray], captions: list[str], columns: int = 8,
                  tile: int = 112) -> np.ndarray:
    """A grid of ``tile``-sized faces, each captioned below (e.g. with its identity)."""
    if not images_bgr:
        raise ValueError("contact sheet needs at least one image")
    caption_height = 16
    rows = (len(images_bgr) + columns - 1) // columns
    columns = min(columns, len(images_bgr))
    sheet = np.full((rows * (tile + caption_height), columns * tile, 3), 255, dtype=np.uint8)
    for position, (image, caption) in enumerate(zip(images_bgr, captions)):
        row, column = divmod(position, columns)
        top, left = row * (tile + caption_height), column * tile
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        resized = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
        sheet[top:top + tile, left:left + tile] = resized
        cv2.putText(sheet, caption[:18], (left + 2, top + tile + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return sheet
