"""``arcface-embed``: face images -> embeddings ``.npy`` + index, from a checkpoint or an ONNX model.

    arcface-embed --model MODEL IMAGES -o OUT.npy [--batch-size 64] [--flip-sum] [--normalize]
                  [--align-landmarks LANDMARKS.txt] [--root DIR] [--device cpu|cuda:0] [--overwrite] [-q]

* ``MODEL``: a checkpoint (directory, its files, or a run folder: latest checkpoint) or an ``.onnx``
  file. Both go through :mod:`eval.embedder` (the project's one embedding path) and
  :mod:`arcface.preprocess` (decode, RGB, ``(pixel - 127.5) / 127.5``), so a checkpoint and its export
  give the same vectors.
* ``IMAGES``: a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.webp, sorted by relative path)
  or a list file (one image path per line, relative to the list's folder or ``--root``; extra
  tab/space-separated fields after the path are ignored; ``#`` starts a comment line).
* Images are expected aligned (112x112, FORMATS.md section 3); other sizes are resized. For unaligned
  photos pass ``--align-landmarks FILE``: one line per image, ``path x1 y1 x2 y2 ... x5 y5`` (left eye,
  right eye, nose tip, left mouth corner, right mouth corner, in the photo's pixels); each photo is
  warped onto the ArcFace template with :func:`recordio_tools.align.align_face` (shared with pack_rec).
* Outputs: ``OUT.npy`` float32 ``[N, D]`` (row i = line i of the index), ``OUT.index.txt`` (the image
  paths as given, one per line) and ``OUT.json`` (model, options, count). Rows are written into a
  memory-mapped temporary file and renamed at the end: a crash leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from recordio_tools.cli_style import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    Parser,
    os_error_status,
)

__all__ = ["EmbedError", "IMAGE_EXTENSIONS", "list_images", "read_landmarks", "load_face", "embed_images",
           "output_paths", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class EmbedError(ValueError):
    """Bad input for arcface-embed (the message names the file and line/image)."""


def list_images(source: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
                ) -> list[tuple[str, Path]]:
    """``(name, path)`` of every image of a folder (recursive, sorted) or a list file (file order).

    ``name`` is what the index records: the path relative to the folder, or the path as written in
    the list. Raises :class:`EmbedError` for a missing source/image or an empty result.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items = [(p.relative_to(source).as_posix(), p) for p in paths]
        if not items:
            raise EmbedError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return items
    if not source.is_file():
        raise EmbedError(f"{source}: no such image folder or list file")
    base = Path(root) if root is not None else source.parent
    items = []
    with open(source, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if "\t" in text:
                name = text.split("\t")[0].strip()
            else:  # a path may contain spaces; otherwise extra space-separated fields follow it
                name = text if (base / text).is_file() or Path(text).is_file() else text.split()[0]
            path = Path(name) if Path(name).is_absolute() else base / name
            if not path.is_file():
                raise EmbedError(f"{source}:{line_number}: image {name!r} not found (looked at {path})")
            items.append((name, path))
    if not items:
        raise EmbedError(f"{source}: the list names no images")
    return items


def read_landmarks(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Landmark file -> ``{image path as written: (5, 2) float64}``.

    Each non-empty, non-``#`` line is ``path`` followed by 10 numbers (x, y of the 5 points).
    """
    path = Path(path)
    if not path.is_file():
        raise EmbedError(f"{path}: no such landmark file")
    landmarks: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 11:
                raise EmbedError(f"{path}:{line_number}: expected an image path and 10 landmark values "
                                 f"(x1 y1 ... x5 y5), got {len(fields) - 1} values")
            try:
                points = np.array([float(v) for v in fields[1:]], dtype=np.float64).reshape(5, 2)
            except ValueError as exc:
                raise EmbedError(f"{path}:{line_number}: landmark values must be numbers ({exc})") from None
            if not np.isfinite(points).all():
                raise EmbedError(f"{path}:{line_number}: landmark values must be finite")
            if fields[0] in landmarks:
                raise EmbedError(f"{path}:{line_number}: landmarks for {fields[0]!r} given twice")
            landmarks[fields[0]] = points
    return landmarks


def load_face(path: Path, landmarks: np.ndarray | None = None) -> np.ndarray:
    """Decode an image file to a 112x112 RGB ``uint8`` face (warped onto the template with ``landmarks``)."""
    from arcface import preprocess

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EmbedError(f"{path}: cannot read image ({exc})") from None
    try:
        rgb = preprocess.decode_rgb(data, source=str(path))
    except preprocess.ImageDecodeError as exc:
        raise EmbedError(str(exc)) from None
    if landmarks is not None:
        from recordio_tools.align import align_face

        try:
            return align_face(rgb, landmarks, size=preprocess.INPUT_SIZE)
        except ValueError as exc:
            raise EmbedError(f"{path}: cannot align with the given landmarks ({exc})") from None
    return preprocess.ensure_size(rgb)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def embed_images(embedder, items: Sequence[tuple[str, Path]], out: np.ndarray, batch_size: int = 64,
                 landmarks: dict[str, np.ndarray] | None = None, normalize: bool = False,
                 progress: bool = True) -> np.ndarray:
    """Embed ``items`` (from :func:`list_images`) into the preallocated ``out`` ``[N, D]``, batch by batch
    (at most one batch of decoded images in memory); rows follow ``items``."""
    from recordio_tools.progress import progress_bar

    if landmarks is not None:
        missing = [name for name, _ in items if name not in landmarks]
        if missing:
            raise EmbedError(f"no landmarks for {len(missing)} image(s), e.g. {missing[:3]} (every image "
                             "needs a line in the --align-landmarks file)")
    row = 0
    bar = progress_bar(total=len(items), unit="img", desc="embedding", disable=not progress)
    with bar:
        for batch in _batches(items, batch_size):
            faces = np.stack([load_face(path, landmarks[name] if landmarks is not None else None)
                              for name, path in batch])
            embeddings = embedder.embed_images(faces)
            if not np.isfinite(embeddings).all():
                bad = batch[int(np.nonzero(~np.isfinite(embeddings).all(axis=1))[0][0])][1]
                raise EmbedError(f"{bad}: the model produced a non-finite embedding")
            if normalize:
                embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
            out[row:row + len(batch)] = embeddings
            row += len(batch)
            bar.update(len(batch))
    return out


def output_paths(output: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``OUT.npy`` -> (embeddings ``.npy``, index ``.index.txt``, summary ``.json``)."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".npy" else output
    return stem.with_suffix(".npy"), Path(f"{stem}.index.txt"), Path(f"{stem}.json")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="arcface-embed", description="Embed face images with a checkpoint or an ONNX model.",
                    epilog=EXIT_STATUS_HELP)
    parser.add_argument("--model", help="checkpoint directory / run folder (its latest checkpoint), or an "
                                        ".onnx file")
    parser.add_deprecated_positional("legacy_model", "MODEL", "model", "--model")
    parser.require("model", "--model")
    parser.add_argument("images", help="folder of images (recursive) or a list file (one path per line)")
    parser.add_argument("-o", "--output", required=True,
                        help="OUT.npy; also writes OUT.index.txt (row -> image) and OUT.json")
    parser.add_argument("--arch", default=None,
                        help="the model may also be an arcface_torch weights file (backbone.pth, "
                             "model.pt); --arch r18|r34|r50|r100|r200|mbf|mbf_large checks its architecture "
                             "(optional: the file's keys and shapes name it)")
    parser.add_argument("--root", default=None, help="base folder of relative paths in a list file "
                                                     "(default: the list's folder)")
    parser.add_argument("--align-landmarks", default=None, metavar="FILE",
                        help="align unaligned photos: lines 'path x1 y1 ... x5 y5' (5 points, photo pixels)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--flip-sum", action="store_true",
                        help="embed image + mirror and sum (the evaluation protocol); default: one image")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--device", default="cpu", help="torch device for checkpoints (cuda:0 also selects "
                                                        "onnxruntime's CUDA provider for .onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``arcface-embed``: 0 on success, 1 when writing fails, 2 on bad arguments or input,
    130 when interrupted."""
    from arcface.checkpoint import CheckpointError
    from eval.embedder import build_embedder

    args = build_parser().parse_args(argv)
    npy_path, index_path, summary_path = output_paths(args.output)
    tmp_npy = npy_path.parent / f".{npy_path.name}.tmp-{uuid.uuid4().hex[:8]}.npy"
    try:
        if args.batch_size < 1:
            raise EmbedError(f"--batch-size must be >= 1, got {args.batch_size}")
        existing = [str(p) for p in (npy_path, index_path, summary_path) if p.exists()]
        if existing and not args.overwrite:
            raise EmbedError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
        items = list_images(args.images, args.root)
        landmarks = read_landmarks(args.align_landmarks) if args.align_landmarks else None
        try:
            embedder = build_embedder(args.model, device=args.device, batch_size=args.batch_size,
                                      flip=args.flip_sum, arch=args.arch)
        except FileNotFoundError as exc:
            raise EmbedError(str(exc)) from None
        embedding_size = int(embedder.embedding_size)
        npy_path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32,
                                        shape=(len(items), embedding_size))
        embed_images(embedder, items, out, args.batch_size, landmarks, args.normalize,
                     progress=not args.quiet)
        out.flush()
        del out
        summary = {"model": str(args.model), "images": str(args.images), "count": len(items),
                   "embedding_size": embedding_size, "flip_sum": args.flip_sum, "normalized": args.normalize,
                   "aligned_with_landmarks": args.align_landmarks, "index": index_path.name,
                   "embeddings": npy_path.name}
        for path, text in ((index_path, "".join(f"{name}\n" for name, _ in items)),
                           (summary_path, json.dumps(summary, indent=2) + "\n")):
            tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        os.replace(tmp_npy, npy_path)  # last: the embeddings exist only once the index does
    except (EmbedError, CheckpointError, ValueError) as exc:
        print(f"arcface-embed: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"arcface-embed: error: {exc}", file=sys.stderr)
        return os_error_status(exc)
    except KeyboardInterrupt:
        print("arcface-embed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        tmp_npy.unlink(missing_ok=True)
    print(f"{npy_path}: {len(items)} x {embedding_size} embeddings; index {index_path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
