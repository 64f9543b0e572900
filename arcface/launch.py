"""``./run.sh train``: check the config, run the training workers under torchrun, say how it ended.

    ./run.sh train CONFIG [section.key=value ...] [--max-steps N]
    TORCHRUN_ARGS="--standalone --nproc_per_node 8" ./run.sh train configs/ms1mv2_r100.toml data.rec=...
    python -m arcface.launch CONFIG ...                    # the same without run.sh

``torchrun -m arcface.train`` works as well; this launcher adds:

* the recipe and overrides are loaded and validated BEFORE any worker starts: a typo'd key is one line
  on stderr and exit status 2 (torchrun would start every worker, each would fail, and its own
  traceback would follow);
* a failed worker ends in one line (one per distinct error): the ranks that hit it, the message, where
  the log is and the latest checkpoint; exit status 1;
* SIGTERM / SIGINT (preemption, Ctrl-C): torchrun forwards the signal, every worker writes its
  preemption checkpoint and stops, and the launcher says where that checkpoint is and how to resume;
  exit status 128 + the signal number.

torchrun's own options come from ``TORCHRUN_ARGS`` (default ``--standalone --nproc_per_node 1``).
Workers learn from ``ARCFACE_LAUNCHER=1`` that their errors are reported here: they write them to
torchrun's per-worker error file instead of printing them once per rank.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from pathlib import Path

__all__ = ["main", "PROG", "LAUNCHER_ENV", "DEFAULT_TORCHRUN_ARGS"]

PROG = "./run.sh train"
LAUNCHER_ENV = "ARCFACE_LAUNCHER"
DEFAULT_TORCHRUN_ARGS = "--standalone --nproc_per_node 1"


def _where(output_dir: Path) -> str:
    """Where the log and the latest complete checkpoint are (for the closing line)."""
    from arcface.train_state import CheckpointError, find_resume_checkpoint

    try:
        latest = find_resume_checkpoint("auto", output_dir)
    except CheckpointError:
        latest = None
    checkpoint = f"latest checkpoint {latest}" if latest else "no checkpoint yet"
    return f"log {output_dir / 'train.log'}; {checkpoint}"


def _failure_lines(failures: dict) -> list[str]:
    """One line per distinct worker error: ``ranks 0, 1: message``."""
    by_message: dict[str, list[int]] = {}
    # When one rank fails, torchrun stops the others with SIGTERM: those are consequences, not causes.
    causes = {rank: f for rank, f in failures.items() if f.exitcode >= 0} or failures
    for rank, failure in sorted(causes.items()):
        if failure.exitcode < 0:
            message = f"killed by {signal.Signals(-failure.exitcode).name}"
        elif failure.error_file_data and isinstance(failure.message, str) and failure.message:
            message = failure.message
        else:  # no error file: an unexpected exception, whose traceback the worker printed above
            message = f"exit status {failure.exitcode} (its traceback is above)"
        by_message.setdefault(message, []).append(rank)
    return [f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {message}"
            for message, ranks in by_message.items()]


def main(argv: list[str] | None = None) -> int:
    from arcface.train import parse_command

    parsed = parse_command(PROG, argv, lambda message: print(f"{PROG}: {message}", file=sys.stderr))
    if parsed is None:
        return 2
    args, cfg = parsed
    if cfg is None:  # --from-insightface-config: a translation, nothing to launch
        from arcface.train import run_translation

        return run_translation(args)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    torchrun_argv = shlex.split(os.environ.get("TORCHRUN_ARGS", DEFAULT_TORCHRUN_ARGS))
    worker_argv = [args.config, *args.overrides]
    if args.max_steps is not None:
        worker_argv += ["--max-steps", str(args.max_steps)]
    if args.quiet:
        worker_argv.append("--quiet")
    try:
        torchrun_args = get_args_parser().parse_args([*torchrun_argv, "-m", "arcface.train", *worker_argv])
    except SystemExit:
        print(f"{PROG}: TORCHRUN_ARGS={os.environ.get('TORCHRUN_ARGS')!r} is not a valid torchrun command "
              "line", file=sys.stderr)
        return 2
    os.environ[LAUNCHER_ENV] = "1"
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and warn; share the cores instead
        per_node = str(torchrun_args.nproc_per_node)
        processes = int(per_node) if per_node.isdigit() else 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    # torchrun's agent logs its own shutdown steps as warnings and errors; this launcher reports the
    # outcome itself. Its module loggers carry their own levels, so each one is set.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run",
                            "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    output_dir = Path(cfg.output.dir)
    try:
        torchrun(torchrun_args)
    except ChildFailedError as exc:
        lines = [f"{PROG}: training failed on {line}" for line in _failure_lines(exc.failures)]
        lines[-1] += f"; {_where(output_dir)}"  # one line for one error, where to look at its end
        print("\n".join(lines), file=sys.stderr)
        return 1
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"{PROG}: stopped by {name}; {_where(output_dir)}; the same command resumes from it",
              file=sys.stderr)
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # Ctrl-C before torchrun started its workers
        print(f"{PROG}: interrupted before training started", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
