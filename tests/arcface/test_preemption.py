"""Preemption under the real ``torchrun``, as a scheduler does it: SIGTERM to torchrun's process group.

torchrun then signals each rank's own process group, which also holds the rank's DataLoader worker
processes. The preemption checkpoint must still be written, for ``data.num_workers`` 0 and 2, on 1 and
2 ranks, and a resumed run must continue exactly: its losses and final weights equal an uninterrupted
run's.

This file is also the worker script torchrun launches (``__main__`` below). In the interrupted run,
rank 0 sends the signal itself after update ``STOP_AT`` (so the test is deterministic): to torchrun's
process group, like ``scancel`` or ``kill -TERM -PGID`` would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.arcface.test_train_loop import backbone_state, global_fc, make_cfg, tiny_bn_factory  # noqa: E402

TIMEOUT_S = 240
STOP_AT = 3


def _write_rec(prefix: Path, classes: int = 13, per_class: int = 8) -> Path:
    import cv2
    import numpy as np

    from recordio_tools.writer import FaceDatasetWriter

    rng = np.random.default_rng(0)
    writer = FaceDatasetWriter(prefix, layout="insightface", num_classes=classes)
    for label in range(classes):
        for _ in range(per_class):
            image = cv2.resize(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), (112, 112))
            writer.add(label, cv2.imencode(".jpg", image)[1].tobytes())
    writer.close()
    return prefix.with_suffix(".rec")


def _worker_main(out: str, rec: str, num_workers: str, stop: str) -> None:
    from arcface.distributed import destroy_distributed
    from arcface.train import train

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])

    def preempt(step: int, loss: float) -> None:
        if stop == "stop" and rank == 0 and step == STOP_AT:
            os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)  # torchrun's group: the scheduler's view
            # torchrun forwards the signal within its monitor interval (0.2 s): wait for it here, so the
            # stop lands on this update's boundary (the other rank waits in the stop agreement).
            time.sleep(2.0)

    cfg = make_cfg(Path(out), 6 // world_size, "data.synthetic=false", f"data.rec={rec}",
                   f"data.num_workers={num_workers}", "data.flip=true", "fc.sample_rate=0.5")
    summary = train(cfg, backbone_factory=tiny_bn_factory, on_update=preempt)
    label = "resumed" if summary["resumed_from"] else "first"
    Path(out, f"summary_{label}_rank{rank}.json").write_text(json.dumps(summary))
    destroy_distributed()


def _torchrun(nproc: int, out: Path, rec: Path, num_workers: int, stop: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--monitor-interval", "0.2", __file__, str(out), str(rec), str(num_workers),
           "stop" if stop else "run"]
    # A session of its own: the signal goes to torchrun's group and not to pytest.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          start_new_session=True)


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_rec(tmp_path_factory.mktemp("preemption") / "train")


@pytest.fixture(scope="module")
def uninterrupted(rec: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"uninterrupted{nproc}")
        proc = _torchrun(nproc, out, rec, 0, stop=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[nproc] = out
    return runs


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigterm_to_torchrun_checkpoints_and_the_resume_continues_exactly(
        rec: Path, uninterrupted: dict[int, Path], tmp_path: Path, nproc: int, num_workers: int) -> None:
    out = tmp_path / "run"
    stopped = _torchrun(nproc, out, rec, num_workers, stop=True)
    assert stopped.returncode != 0  # torchrun reports the signal
    log = (out / "train.log").read_text()
    assert f"received SIGTERM: checkpoint written at step {STOP_AT}" in log, stopped.stderr[-4000:]
    assert "DataLoader worker" not in stopped.stderr
    resumed = _torchrun(nproc, out, rec, num_workers, stop=False)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    reference_dir = uninterrupted[nproc]
    for rank in range(nproc):
        first = json.loads((out / f"summary_first_rank{rank}.json").read_text())
        second = json.loads((out / f"summary_resumed_rank{rank}.json").read_text())
        reference = json.loads((reference_dir / f"summary_first_rank{rank}.json").read_text())
        assert first["stopped_by"] == signal.SIGTERM and first["step"] == STOP_AT
        assert second["resumed_from"].endswith(f"step_{STOP_AT:08d}")
        assert first["losses"] + second["losses"] == reference["losses"]
    final, expected = Path(second["checkpoint"]), Path(reference["checkpoint"])
    for key, value in backbone_state(expected).items():
        torch.testing.assert_close(backbone_state(final)[key], value, rtol=0, atol=0)
    torch.testing.assert_close(global_fc(final), global_fc(expected), rtol=0, atol=0)


if __name__ == "__main__":
    _worker_main(*sys.argv[1:5])
