"""Command-line conventions shared by the console scripts (``pack_rec``, ``arcface-eval``,
``arcface-export``, ``arcface-embed``).

* Spelling: ``--model`` names the model to use, ``-o/--output`` the output path or folder, ``-q/--quiet``
  silences progress bars and progress messages (results and errors are still printed).
* Exit status: :data:`EXIT_OK` (0) success; :data:`EXIT_FAILURE` (1) the command ran and failed (a check
  it performs failed, the work could not be completed, a write failed); :data:`EXIT_USAGE` (2) usage or
  input error: bad arguments, or input files that are missing or invalid (reported before or instead of
  the work); :data:`EXIT_INTERRUPTED` (130) stopped by Ctrl-C.
* Help: every option has a help text; a default is shown once, as ``(default: X)``.
* Renamed spellings keep working for a while: they print a one-line deprecation warning on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "HelpFormatter", "Parser",
           "EXIT_STATUS_HELP", "DeprecatedOption", "warn_deprecated", "os_error_status"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_STATUS_HELP = ("exit status: 0 done; 1 failed while running; 2 bad arguments or input files "
                    "(missing or invalid); 130 interrupted")


def os_error_status(error: OSError) -> int:
    """A path that does not exist (or is a file where a folder is expected, or the reverse) is an input
    error (2); any other ``OSError`` (permissions, a full disk, I/O) a failure while running (1)."""
    if isinstance(error, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return EXIT_USAGE
    return EXIT_FAILURE


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and ``(default: X)`` added once to options whose default says something.

    Nothing is added when the help text already states its default (``(default ...``), for flags
    (``store_true``/``store_false``) and for options without a default value (``None``).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" in text or "%(default)" in text or default is None or default is argparse.SUPPRESS
                or action.nargs == 0 or (isinstance(default, list | tuple) and not default)
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)"


def warn_deprecated(prog: str, old: str, new: str) -> None:
    """One line on stderr: ``PROG: warning: OLD is deprecated; use NEW``."""
    print(f"{prog}: warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


class DeprecatedOption(argparse.Action):
    """An old option spelling: stores into the new option's ``dest`` and warns; hidden from ``--help``."""

    def __init__(self, option_strings: Sequence[str], dest: str, use: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("help", argparse.SUPPRESS)
        kwargs["default"] = argparse.SUPPRESS  # never overwrites the new option's default
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn_deprecated(parser.prog, option_string or "/".join(self.option_strings), self.use)
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with :class:`HelpFormatter` and checks that run after parsing.

    Use it as ``parser_class`` of sub-commands too, so each sub-command's checks run with its own usage
    line in the error message.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._after_parse: list[Callable[[argparse.Namespace], None]] = []
        self._required_after_parse: list[argparse.Action] = []

    def add_output(self, help: str, dest: str = "output", required: bool = True, metavar: str | None = None,
                   old_options: Sequence[str] = ()) -> None:
        """``-o/--output`` (plus hidden, deprecated ``old_options`` storing into the same ``dest``)."""
        self.add_argument("-o", "--output", dest=dest, default=None, metavar=metavar, help=help)
        if old_options:
            self.add_argument(*old_options, dest=dest, action=DeprecatedOption, use="-o/--output")
        if required:
            self.require(dest, "-o/--output")

    def add_quiet(self, help: str = "no progress bars or progress messages") -> None:
        self.add_argument("-q", "--quiet", action="store_true", help=help)

    def require(self, dest: str, spelling: str) -> None:
        """After parsing, ``dest`` must be set (by its option or a deprecated spelling of it); the usage
        line shows the option as required."""
        self._required_after_parse += [action for action in self._actions if action.dest == dest
                                       and action.option_strings and not isinstance(action, DeprecatedOption)]

        def check(namespace: argparse.Namespace) -> None:
            if getattr(namespace, dest, None) is None:
                self.error(f"the following arguments are required: {spelling}")

        self._after_parse.append(check)

    def add_deprecated_positional(self, old_dest: str, metavar: str, dest: str, spelling: str) -> None:
        """An optional positional argument (hidden from ``--help``) that used to carry what ``spelling``
        now carries: it stores into ``dest`` with a deprecation warning; giving both is an error."""
        self.add_argument(old_dest, nargs="?", default=None, metavar=metavar, help=argparse.SUPPRESS)

        def check(namespace: argparse.Namespace) -> None:
            old = getattr(namespace, old_dest, None)
            if hasattr(namespace, old_dest):
                delattr(namespace, old_dest)
            if old is None:
                return
            if getattr(namespace, dest, None) is not None:
                self.error(f"{spelling} given twice (as {spelling} and as the positional {metavar}); "
                           f"give it once, as {spelling}")
            warn_deprecated(self.prog, f"{metavar} as a positional argument", f"{spelling} {metavar}")
            setattr(namespace, dest, old)

        # Before the "required" checks, which may be satisfied by the old spelling.
        self._after_parse.insert(0, check)

    @contextlib.contextmanager
    def _usage_shows_required(self) -> Iterator[None]:
        # Options that a deprecated spelling may also satisfy are checked after parsing, but the usage
        # line shows them as what they are: required.
        for action in self._required_after_parse:
            action.required = True
        try:
            yield
        finally:
            for action in self._required_after_parse:
                action.required = False

    def format_usage(self) -> str:
        with self._usage_shows_required():
            return super().format_usage()

    def format_help(self) -> str:
        with self._usage_shows_required():
            return super().format_help()

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if not extras:  # otherwise "unrecognized arguments" is the error to report
            for check in self._after_parse:
                check(namespace)
        return namespace, extras
