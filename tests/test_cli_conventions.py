"""One command-line style across pack_rec, arcface-eval, arcface-export and arcface-embed: the same spelling
for the same thing, help on every option with its default shown once, old spellings still accepted with a
warning, and exit status 2 for usage/input errors, 1 for failures while running, 130 when interrupted."""

from __future__ import annotations

import argparse
import re

import pytest

from arcface.deploy import embed, export
from eval import cli as eval_cli
from recordio_tools import cli as pack_rec_cli
from recordio_tools.errors import RecordIOError


def _all_parsers() -> list[argparse.ArgumentParser]:
    parsers = [eval_cli.build_parser(), export.build_parser(), embed.build_parser()]
    top = pack_rec_cli.build_parser()
    parsers.append(top)
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action)


def test_every_option_has_help_and_its_default_shown_once():
    parsers = _all_parsers()
    assert {p.prog for p in parsers} >= {"arcface-eval", "arcface-export", "arcface-embed", "pack_rec pack",
                                          "pack_rec info", "pack_rec verify", "pack_rec reindex",
                                          "pack_rec unpack", "pack_rec bin", "pack_rec synth"}
    missing, doubled, unshown = [], [], []
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if action.help is argparse.SUPPRESS:
                # Only deprecated spellings are hidden, and each stores into a visible option's dest.
                visible = {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}
                assert action.dest in visible or action.nargs == "?", name
                continue
            if not action.help or not action.help.strip():
                missing.append(name)
                continue
            text = _help_of(parser, action)
            if len(re.findall(r"\bdefault\b", text)) > 1:
                doubled.append(f"{name}: {text}")
            meaningful = action.default not in (None, False, True, argparse.SUPPRESS, [], ())
            if meaningful and action.option_strings and "default" not in text:
                unshown.append(f"{name} (default {action.default!r}): {text}")
    assert not missing, f"options without help: {missing}"
    assert not doubled, f"defaults stated twice: {doubled}"
    assert not unshown, f"defaults not shown: {unshown}"


@pytest.mark.parametrize("argv, dest, expected", [
    (["pack", "SRC", "-o", "OUT", "-q"], "output_prefix", "OUT"),
    (["pack", "SRC", "--output", "OUT", "--quiet"], "output_prefix", "OUT"),
    (["verify", "DATA", "-q"], "quiet", True),
    (["reindex", "a.rec", "-o", "a.idx"], "idx", "a.idx"),
    (["unpack", "DATA", "-o", "DIR"], "out", "DIR"),
    (["bin", "pairs.txt", "-o", "p.bin"], "output", "p.bin"),
    (["synth", "-o", "DIR", "--identities", "2", "--images-per-identity", "2", "-q"], "out", "DIR"),
])
def test_pack_rec_spelling(argv, dest, expected, capsys):
    args = pack_rec_cli.build_parser().parse_args(argv)
    assert getattr(args, dest) == expected
    if "-q" in argv or "--quiet" in argv:
        assert args.quiet is True
    assert "deprecated" not in capsys.readouterr().err


def test_model_output_quiet_spelled_alike_in_eval_export_embed(capsys):
    args = eval_cli.build_parser().parse_args(["--model", "M", "-o", "OUT", "-q", "--bin", "x.bin"])
    assert (args.model, args.output, args.quiet) == ("M", "OUT", True)
    args = export.build_parser().parse_args(["--model", "M", "-o", "OUT", "-q"])
    assert (args.model, args.output, args.quiet) == ("M", "OUT", True)
    args = embed.build_parser().parse_args(["--model", "M", "IMAGES", "-o", "OUT", "-q"])
    assert (args.model, args.images, args.output, args.quiet) == ("M", "IMAGES", "OUT", True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("build, argv, dest, expected, warning", [
    (pack_rec_cli.build_parser, ["pack", "SRC", "OUT"], "output_prefix", "OUT",
     "OUTPUT_PREFIX as a positional"),
    (pack_rec_cli.build_parser, ["bin", "pairs.txt", "p.bin"], "output", "p.bin", "OUTPUT as a positional"),
    (pack_rec_cli.build_parser, ["unpack", "DATA", "--out", "DIR"], "out", "DIR", "--out is deprecated"),
    (pack_rec_cli.build_parser, ["reindex", "a.rec", "--idx", "a.idx"], "idx", "a.idx",
     "--idx is deprecated"),
    (pack_rec_cli.build_parser, ["synth", "--out", "DIR", "--identities", "2", "--images-per-identity", "2"],
     "out", "DIR", "--out is deprecated"),
    (export.build_parser, ["CKPT", "-o", "OUT"], "model", "CKPT", "CHECKPOINT as a positional"),
    (embed.build_parser, ["M", "IMAGES", "-o", "OUT"], "model", "M", "MODEL as a positional"),
])
def test_old_spellings_still_work_with_a_warning(build, argv, dest, expected, warning, capsys):
    args = build().parse_args(argv)
    assert getattr(args, dest) == expected
    err = capsys.readouterr().err
    assert warning in err and "deprecated" in err and err.count("\n") == 1
    assert not any(name.startswith("legacy_") or name == "checkpoint" for name in vars(args))


@pytest.mark.parametrize("build, argv, message", [
    (pack_rec_cli.build_parser, ["pack", "SRC", "OUT", "-o", "OUT2"], "given twice"),
    (pack_rec_cli.build_parser, ["pack", "SRC"], "required: -o/--output"),
    (pack_rec_cli.build_parser, ["bin", "pairs.txt"], "required: -o/--output"),
    (pack_rec_cli.build_parser, ["synth", "--identities", "2", "--images-per-identity", "2"],
     "required: -o/--output"),
    (export.build_parser, ["-o", "OUT"], "required: --model"),
    (export.build_parser, ["CKPT", "--model", "CKPT", "-o", "OUT"], "given twice"),
    (embed.build_parser, ["IMAGES", "-o", "OUT"], "required: --model"),
    (eval_cli.build_parser, ["--model", "M"], "required: -o/--output"),
])
def test_usage_errors_exit_2_with_usage(build, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build().parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage:")


def test_usage_line_shows_required_options_as_required(capsys):
    for build, argv, shown in ((pack_rec_cli.build_parser, ["pack", "--help"], " -o PREFIX "),
                               (export.build_parser, ["--help"], " --model MODEL -o OUTPUT"),
                               (embed.build_parser, ["--help"], " --model MODEL -o OUTPUT")):
        with pytest.raises(SystemExit):
            build().parse_args(argv)
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert shown in usage, usage


def _raise(error):
    def command(*args, **kwargs):
        raise error
    return command


@pytest.mark.parametrize("error, status", [
    (RecordIOError("not a RecordIO file", "x.rec", offset=0), 2),
    (ValueError("bad value"), 2),
    (FileNotFoundError(2, "No such file or directory", "missing.rec"), 2),
    (PermissionError(13, "Permission denied", "out.rec"), 1),
    (OSError(28, "No space left on device", "out.rec"), 1),
    (KeyboardInterrupt(), 130),
])
def test_pack_rec_exit_status(monkeypatch, capsys, error, status):
    monkeypatch.setattr(pack_rec_cli, "_cmd_info", _raise(error))
    assert pack_rec_cli.main(["info", "data"]) == status
    err = capsys.readouterr().err
    assert err.startswith("pack_rec info: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("error, status", [
    (ValueError("bad value"), 2),
    (FileNotFoundError(2, "No such file or directory", "missing.bin"), 2),
    (PermissionError(13, "Permission denied", "report.md"), 1),
    (OSError(28, "No space left on device", "report.json"), 1),
    (KeyboardInterrupt(), 130),
])
def test_eval_export_embed_exit_status(monkeypatch, capsys, error, status):
    monkeypatch.setattr(eval_cli, "run", _raise(error))
    assert eval_cli.main(["--model", "m.onnx", "-o", "out", "--bin", "x.bin"]) == status
    monkeypatch.setattr(export, "export_checkpoint", _raise(error))
    assert export.main(["--model", "ckpt", "-o", "out"]) == status
    monkeypatch.setattr(embed, "list_images", _raise(error))
    assert embed.main(["--model", "m.onnx", "images", "-o", "out/emb.npy"]) == status
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["arcface-eval", "arcface-export", "arcface-embed"]


def test_export_failure_while_running_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(export, "export_checkpoint", _raise(export.ExportError("onnx.checker rejects it")))
    assert export.main(["--model", "ckpt", "-o", "out"]) == 1
    assert "onnx.checker rejects it" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["pack", "--help"], ["info", "--help"]])
def test_help_names_the_exit_status(command, capsys):
    with pytest.raises(SystemExit) as stop:
        pack_rec_cli.main(command)
    assert stop.value.code == 0
    assert "exit status: 0" in capsys.readouterr().out
