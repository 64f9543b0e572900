"""Exceptions raised for bad data: every message names the file and, where known, the key and offset."""

from __future__ import annotations


class RecordIOError(ValueError):
    """Malformed or unreadable RecordIO / dataset data.

    ``path``, ``key`` and ``offset`` locate the problem; the message already includes them so that a
    CLI can print ``str(error)`` and nothing else.
    """

    def __init__(self, message: str, path: str | None = None, key: int | None = None,
                 offset: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.key = key
        self.offset = offset
        self.reason = message
        super().__init__(format_location(message, self.path, key, offset))


def format_location(message: str, path: str | None = None, key: int | None = None,
                    offset: int | None = None) -> str:
    """``"<path> key K at byte B: message"`` with the parts that are known."""
    where = []
    if path is not None:
        where.append(str(path))
    if key is not None:
        where.append(f"key {key}")
    if offset is not None:
        where.append(f"at byte {offset}")
    return f"{' '.join(where)}: {message}" if where else message


class ImageError(RecordIOError):
    """An image (file or record payload) that cannot be read, decoded or encoded."""


class PackError(RecordIOError):
    """A problem with the inputs of ``pack`` (source tree, list file, options)."""


class UnsafePickleError(RecordIOError):
    """A verification pack contains pickle content other than tuple/list/bytes/bool."""
