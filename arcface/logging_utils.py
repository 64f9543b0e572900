"""Training logs: a rank-0 line every N updates, TensorBoard scalars, a progress bar, a log file.

:class:`MetricLogger` is what the training loop talks to. Every rank may call it; only rank 0 prints,
writes ``train.log`` (appended, so a resumed run continues the same file) and TensorBoard events. A line
looks like::

    step 1200/228000 epoch 0 | loss 21.4312 | lr 0.09994 | grad 4.21 | 1523.4 samples/s | data 3.1% |
    mem 9.81 GiB | eta 10:24:13

* ``samples/s`` is GLOBAL (all ranks, all accumulation micro-batches) over the window since the last
  line, measured on the wall clock, so it includes data waits, logging, verification and checkpoints;
* ``data`` is the share of that window rank 0 spent waiting for the next batch (the loader's own
  measurement): above a few percent the input pipeline is the bottleneck;
* ``mem`` is the CUDA peak allocated memory of the window on GPU, the process's resident memory on CPU;
* ``eta`` extrapolates the window's time per update to the remaining updates.

On a terminal (stdout is a TTY) a tqdm bar shows progress with rate and ETA between the lines; in a
batch job (no TTY) only the lines are printed.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["MetricLogger", "format_duration", "memory_bytes", "LOG_FILE"]

LOG_FILE = "train.log"


def format_duration(seconds: float) -> str:
    """``3725.4`` -> ``"1:02:05"``; days are spelled out (``"2d 03:00:00"``); non-finite -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset on GPU; current resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        # statm: sizes in pages; the second field is the resident set.
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class MetricLogger:
    """Rank-0 training log: periodic lines, TensorBoard scalars, a progress bar and ``train.log``.

    Args:
        output_dir: run folder (``train.log`` and the TensorBoard events go to ``output_dir`` and
            ``output_dir/tensorboard``).
        total_steps: optimiser updates of the whole run (for progress and ETA).
        global_batch_size: samples per update over all ranks (for samples/s).
        log_every: print a line every N updates (and always at the last one).
        rank: this process's rank; everything is a no-op except on rank 0.
        device: where training runs (which memory to report).
        start_step: the update the run (re)starts from.
        tensorboard: write TensorBoard scalars.
        progress: show a tqdm bar; ``None`` = only when stdout is a terminal.
        stream: where lines are printed (stdout by default).
    """

    def __init__(self, output_dir: str | os.PathLike[str], total_steps: int, global_batch_size: int,
                 log_every: int = 50, rank: int = 0, device: torch.device | str = "cpu", start_step: int = 0,
                 tensorboard: bool = True, progress: bool | None = None,
                 stream: TextIO | None = None) -> None:
        if log_every < 1:
            raise ValueError(f"runtime.log_every must be >= 1, got {log_every}")
        self.enabled = rank == 0
        self.output_dir = Path(output_dir)
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.log_every = int(log_every)
        self.device = torch.device(device)
        self.stream = stream if stream is not None else sys.stdout
        self._writer: Any = None
        self._file: TextIO | None = None
        self._bar: Any = None
        self._reset_window(start_step)
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output_dir / LOG_FILE, "a", encoding="utf-8", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # optional dependency: say how to get it instead of failing the run
                self.info(f"TensorBoard disabled: {exc} (pip install tensorboard, or set "
                          "output.tensorboard=false)")
            else:
                self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"),
                                             purge_step=start_step if start_step > 0 else None)
        if progress is None:
            progress = bool(getattr(self.stream, "isatty", lambda: False)())
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=self.stream, smoothing=0.05)

    # -- plain messages --------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """Print ``message`` (rank 0) and append it, time-stamped, to ``train.log``."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)
        if self._file is not None:
            stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            for line in message.splitlines() or [""]:
                self._file.write(f"[{stamp}] {line}\n")

    # -- per-update metrics ----------------------------------------------------------------------
    def _reset_window(self, step: int) -> None:
        self._window_start_time = time.perf_counter()
        self._window_start_step = step
        self._loss_sum = 0.0
        self._loss_count = 0
        self._data_wait = 0.0
        self._grad_norm = float("nan")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def update(self, step: int, loss: float, lr: float, data_wait_s: float = 0.0,
               grad_norm: float | torch.Tensor | None = None, epoch: int | None = None,
               extra: dict[str, float] | None = None) -> str | None:
        """Record the update that just finished (``step`` = updates done so far) and maybe log a line.

        ``loss`` is the update's loss (non-finite losses are skipped by the loop and not passed here);
        ``data_wait_s`` the seconds this update waited for data; ``grad_norm`` may be a tensor: it is
        read (a device sync) only on logging steps. Returns the line when one was written.
        """
        if not self.enabled:
            return None
        self._loss_sum += float(loss)
        self._loss_count += 1
        self._data_wait += float(data_wait_s)
        if self._bar is not None:
            self._bar.update(1)
        if not self.logs_at(step):
            return None
        if grad_norm is not None:
            self._grad_norm = float(grad_norm)
        elapsed = max(time.perf_counter() - self._window_start_time, 1e-9)
        updates = max(step - self._window_start_step, 1)
        samples_per_s = updates * self.global_batch_size / elapsed
        data_share = min(self._data_wait / elapsed, 1.0)
        mean_loss = self._loss_sum / max(self._loss_count, 1)
        eta = (self.total_steps - step) * elapsed / updates
        memory = memory_bytes(self.device)
        parts = [f"step {step}/{self.total_steps}" + (f" epoch {epoch}" if epoch is not None else ""),
                 f"loss {mean_loss:.4f}", f"lr {lr:.6g}", f"grad {self._grad_norm:.3g}",
                 f"{samples_per_s:.1f} samples/s", f"data {100 * data_share:.1f}%",
                 f"mem {memory / 2**30:.2f} GiB", f"eta {format_duration(eta)}"]
        if extra:
            parts.extend(f"{key} {value:.4g}" for key, value in extra.items())
        line = " | ".join(parts)
        self.info(line)
        self.scalars(step, {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": self._grad_norm,
                            "train/samples_per_s": samples_per_s, "train/data_wait_share": data_share,
                            "train/memory_gib": memory / 2**30, **{f"train/{k}": v for k, v in
                                                                  (extra or {}).items()}})
        self._reset_window(step)
        return line

    def logs_at(self, step: int) -> bool:
        """Whether :meth:`update` of ``step`` writes a line (every ``log_every`` updates and the last)."""
        return step % self.log_every == 0 or step == self.total_steps

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Write TensorBoard scalars (rank 0; no-op without TensorBoard); non-finite values are skipped."""
        if not self.enabled or self._writer is None:
            return
        for tag, value in values.items():
            value = float(value)
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, step)

    def restart_window(self, step: int) -> None:
        """Start a new measuring window, e.g. after a verification pass, so that its pause is not
        counted in the next line's samples/s and ETA."""
        if self.enabled:
            self._reset_window(step)

    def close(self) -> None:
        """Flush and close the bar, the event file and the log file."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
