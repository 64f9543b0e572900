"""recordio_tools.progress: plain lines in files and pipes, tqdm's redrawn bar on a terminal."""

from __future__ import annotations

import io

from recordio_tools.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_whole_lines_and_the_final_count() -> None:
    stream = io.StringIO()
    for _ in progress_bar(range(5000), desc="pack", unit="img", file=stream):
        pass
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert lines[0].startswith("pack:   0%") and lines[-1].startswith("pack: 100%")
    assert "5000/5000" in lines[-1]
    assert len(lines) <= 3  # a fast loop: the start, perhaps one refresh, the end (one per 30 s at most)


def test_a_terminal_gets_the_redrawn_bar() -> None:
    stream = _Terminal()
    with progress_bar(total=10, desc="embed", unit="img", file=stream) as bar:
        bar.update(10)
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue()


def test_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    for _ in progress_bar(range(10), file=stream, disable=True):
        pass
    assert stream.getvalue() == ""
