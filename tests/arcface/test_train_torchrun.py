"""Training under the real ``torchrun``: a killed rank is restarted and resumes; two agents train together.

This file is also the worker script torchrun launches (``__main__`` below): it calls
:func:`arcface.train.train` with the tiny batch-independent backbone of ``test_train_loop`` and, to
simulate a crash, SIGKILLs rank 1 after a given update of the FIRST attempt only
(``TORCHELASTIC_RESTART_COUNT`` tells attempts apart). Both tests compare the losses with a
single-process run of the same global batch: a restart that did not resume exactly would differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.arcface.test_train_loop import make_cfg, tiny_factory  # noqa: E402
from tests.dist_utils import find_free_port  # noqa: E402

TIMEOUT_S = 240


def _write_pack(path: Path, pairs: int = 10) -> Path:
    """A small verification pack of random PNGs (the accuracy is meaningless; the plumbing is tested)."""
    import cv2
    import numpy as np

    from recordio_tools.verification_bin import write_bin

    rng = np.random.default_rng(0)
    bins = [cv2.imencode(".png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
            for _ in range(2 * pairs)]
    return write_bin(path, bins, [i % 2 == 0 for i in range(pairs)])


def _worker_main(out: str, kill_step: int, *overrides: str) -> None:
    from arcface.distributed import destroy_distributed
    from arcface.train import train

    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def crash(step: int, loss: float) -> None:
        if attempt == 0 and rank == 1 and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no checkpoint: a real crash

    cfg = make_cfg(Path(out), 6, "output.checkpoint_every=2", *overrides)
    summary = train(cfg, backbone_factory=tiny_factory, on_update=crash)
    Path(out, f"summary_rank{rank}_attempt{attempt}.json").write_text(json.dumps(summary))
    destroy_distributed()


def _reference_losses(tmp_path: Path) -> list[float]:
    from arcface.train import train

    return train(make_cfg(tmp_path / "reference", 12), backbone_factory=tiny_factory)["losses"]


def _torchrun(*args: str) -> list[str]:
    env_python = sys.executable
    return [env_python, "-m", "torch.distributed.run", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_rank_restarts_and_resumes_from_checkpoint(tmp_path: Path) -> None:
    reference = _reference_losses(tmp_path)
    out = tmp_path / "run"
    pack = _write_pack(tmp_path / "pairs.bin")
    # Verification on rank 0 every 3 updates (the other rank waits at a barrier) rides along.
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
                    "--monitor-interval", "0.2", __file__, str(out), "3",
                    f"eval.bins=[{pack}]", "eval.every=3")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The first attempt died (rank 1 after update 3); the second finished, both ranks, from step 2.
    assert not list(out.glob("summary_*_attempt0.json"))
    for rank in (0, 1):
        summary = json.loads((out / f"summary_rank{rank}_attempt1.json").read_text())
        assert summary["step"] == 6
        assert summary["resumed_from"].endswith("step_00000002")
        # Rank 0 evaluated (steps 3 and 6 of the second attempt); rank 1 only waited.
        assert list(summary["verification"]) == (["pairs"] if rank == 0 else [])
        torch.testing.assert_close(torch.tensor(summary["losses"], dtype=torch.float64),
                                   torch.tensor(reference[2:], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert "resumed from" in (out / "train.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                        "step_00000006"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_torchrun_agents_train_together(tmp_path: Path) -> None:
    reference = _reference_losses(tmp_path)
    out = tmp_path / "run"
    port = find_free_port()
    common = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", f"two-agents-{port}", "--monitor-interval", "0.2")
    pack = _write_pack(tmp_path / "pairs.bin")
    evaluation = (f"eval.bins=[{pack}]", "eval.every=3", "eval.distributed=true")  # spread over both ranks
    agents = [subprocess.Popen(_torchrun(*common, __file__, str(out), "-1", *evaluation), cwd=ROOT,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    for agent, text in zip(agents, outputs):
        assert agent.returncode == 0, text[-5000:]
    for rank in (0, 1):
        summary = json.loads((out / f"summary_rank{rank}_attempt0.json").read_text())
        assert summary["world_size"] == 2 and summary["step"] == 6
        torch.testing.assert_close(torch.tensor(summary["losses"], dtype=torch.float64),
                                   torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    results = [json.loads((out / f"summary_rank{rank}_attempt0.json").read_text())["verification"]
               for rank in (0, 1)]
    for result in results:
        result["pairs"].pop("seconds")  # each rank times its own call
    assert list(results[0]) == ["pairs"] and results[0] == results[1]
    meta = json.loads((out / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(list((out / "checkpoints" / "step_00000006").glob("fc_shard_*-of-00002.pt"))) == 2


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
