"""Verification packs (``.bin``: LFW, CFP-FP, AgeDB-30, ...): a safe reader and an atomic writer.

A pack is a pickle of ``(bins, issame_list)``: ``2*P`` encoded images and ``P`` booleans. Pickle can run
arbitrary code, so :func:`load_bin` uses an unpickler that resolves no global at all except the one
helper Python 3 itself emits for ``bytes`` under protocol 2; tuples, lists, bytes and booleans need no
global. Anything else is refused before it is built.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from .errors import RecordIOError, UnsafePickleError

# Python 3 pickles ``bytes`` at protocols 0-2 as ``_codecs.encode(latin-1 text)``: harmless, and needed
# to read such packs. Nothing else is ever resolved.
_ALLOWED_GLOBALS = {("_codecs", "encode")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle: io.BufferedIOBase, path: str) -> None:
        # encoding="bytes": Python 2 ``str`` objects (the image bytes of old packs) stay bytes.
        super().__init__(handle, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: a verification pack may only contain "
            f"tuple/list/bytes/bool", self._path)

    def persistent_load(self, pid):  # noqa: D102 - pickle hook
        raise UnsafePickleError("refusing pickle persistent ids in a verification pack", self._path)


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read a verification pack safely; return ``(bins, issame)`` with ``len(bins) == 2 * len(issame)``.

    Raises :class:`UnsafePickleError` for any pickle content other than tuple/list/bytes/bool, and
    :class:`RecordIOError` (naming the file) for a malformed or truncated pack.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise RecordIOError(f"cannot open verification pack: {error.strerror or error}", str(path)) from None
    with handle:
        try:
            obj = _RestrictedUnpickler(handle, str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, MemoryError) as error:
            raise RecordIOError(f"not a readable verification pack (pickle error: {error})",
                                str(path)) from None
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise RecordIOError(f"expected a pickled (bins, issame_list) pair, got {type(obj).__name__}"
                            f"{'' if not isinstance(obj, tuple | list) else f' of length {len(obj)}'}",
                            str(path))
    bins, issame = obj
    if not isinstance(bins, list | tuple) or not isinstance(issame, list | tuple):
        raise RecordIOError("bins and issame_list must be lists", str(path))
    for index, item in enumerate(bins):
        if not isinstance(item, bytes | bytearray):
            raise RecordIOError(f"bins[{index}] is {type(item).__name__}, expected encoded image bytes",
                                str(path))
    for index, item in enumerate(issame):
        if not isinstance(item, bool):
            raise RecordIOError(f"issame_list[{index}] is {type(item).__name__}, expected bool", str(path))
    if len(bins) != 2 * len(issame):
        raise RecordIOError(f"{len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})",
                            str(path))
    return [bytes(item) for item in bins], list(issame)


def write_bin(path: str | os.PathLike, bins: list[bytes], issame: list[bool]) -> Path:
    """Write a verification pack atomically (temporary name, then rename); return its path."""
    path = Path(path)
    bins = [bytes(item) for item in bins]
    issame = [bool(item) for item in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            # Protocol 4: bytes as BINBYTES (readable by every Python 3 and by the packs' usual loaders).
            pickle.dump((bins, issame), handle, protocol=4)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
