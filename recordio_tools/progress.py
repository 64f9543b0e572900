"""Progress bars that suit where they are written: tqdm on a terminal, plain lines in a file or pipe.

A tqdm bar redraws itself with carriage returns. In a log file (a cluster job's stdout, ``| tee``, CI)
that becomes one enormous line of overwritten bars. :func:`progress_bar` keeps tqdm's bookkeeping (rate,
ETA, counts) and, when the stream is not a terminal, writes each refresh as its own line, at most one
every ``PLAIN_INTERVAL_S`` seconds, plus the final count. Shared by the RecordIO tools, evaluation,
export and embedding (this package depends on nothing else of the project).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = ["progress_bar", "PLAIN_INTERVAL_S"]

PLAIN_INTERVAL_S = 30.0


class _LineWriter:
    """File-like: each tqdm refresh (``\\r`` + bar + padding) becomes one plain line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str | None = None, unit: str = "it", disable: bool = False, file: TextIO | None = None,
                 **kwargs: Any) -> Any:
    """A ``tqdm`` bar on ``file`` (stderr by default): redrawn in place on a terminal; elsewhere one plain
    line per ``PLAIN_INTERVAL_S`` seconds and one at the end. Extra keyword arguments go to tqdm."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=_LineWriter(stream),
                mininterval=PLAIN_INTERVAL_S, maxinterval=PLAIN_INTERVAL_S, ncols=100, ascii=True, **kwargs)
