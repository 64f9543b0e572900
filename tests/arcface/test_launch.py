"""``./run.sh train`` (arcface.launch): config errors before any worker starts, a failed worker or a signal
reported in one line each, never a torchrun traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arcface import launch
from tests.paths import ROOT

SMALL = ["runtime.batch_size=4", "data.synthetic_num_images=64", "backbone.embedding_size=32",
         "output.tensorboard=false", "runtime.log_every=1"]


def _launch(*args: str, nproc: int = 1, **popen: object) -> subprocess.Popen:
    env = dict(os.environ, TORCHRUN_ARGS=f"--standalone --nproc_per_node {nproc} --monitor-interval 0.2",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ARCFACE_LAUNCHER"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "arcface.launch", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_a_typo_is_one_line_and_exit_2_before_any_worker(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["cpu_synthetic", "fc.sample_ratee=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "./run.sh train: override 'fc.sample_ratee=0.1': unknown config key 'fc.sample_ratee' "
        "(did you mean 'sample_rate'?)"]


def test_no_arguments_show_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ./run.sh train") and "section.key=value" in err


@pytest.mark.distributed
@pytest.mark.slow
def test_the_same_error_on_two_ranks_is_reported_once(tmp_path: Path) -> None:
    proc = _launch("cpu_synthetic", "data.synthetic=false", f"data.rec={tmp_path / 'missing.rec'}",
                   f"output.dir={tmp_path / 'run'}", *SMALL, nproc=2)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1
    # Which ranks report it depends on timing: once one rank fails, torchrun stops the others (SIGTERM),
    # and a rank stopped before it reached the error is a consequence, not listed. The message: once.
    (failure,) = err.strip().splitlines()
    missing = re.escape(str(tmp_path / "missing.rec"))
    log = re.escape(str(tmp_path / "run" / "train.log"))
    assert re.fullmatch(rf"\./run\.sh train: training failed on (rank [01]|ranks 0, 1): {missing}: "
                        rf"record file not found; log {log}; no checkpoint yet", failure), failure


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_job_checkpoints_and_says_where(tmp_path: Path, signum: int) -> None:
    out_dir = tmp_path / "run"
    proc = _launch("cpu_synthetic", f"output.dir={out_dir}", "schedule.total_steps=100000", *SMALL,
                   start_new_session=True)
    log = out_dir / "train.log"
    deadline = time.monotonic() + 180
    while not (log.exists() and "step 2/" in log.read_text()):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signum)  # the whole job, as a scheduler or a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    checkpoints = sorted((out_dir / "checkpoints").iterdir())
    assert checkpoints and f"received {signal.Signals(signum).name}: checkpoint written" in log.read_text()
    assert err.strip().splitlines() == [
        f"./run.sh train: stopped by {signal.Signals(signum).name}; log {log}; latest checkpoint "
        f"{checkpoints[-1]}; the same command resumes from it"]
