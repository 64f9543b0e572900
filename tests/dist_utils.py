"""Run a function in W gloo processes on 127.0.0.1 and collect each rank's result.

    results = run_distributed(fn, world_size=2, args=(x,), timeout_s=120)

``fn(rank, world_size, *args)`` must be a module-level (picklable) function; it runs in a fresh
``spawn``-ed interpreter with the default process group already initialised (gloo, a free port) and
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` exported, so code that calls
``arcface.distributed.init_distributed()`` sees a torchrun-like environment. Its return value (tensors,
numbers, strings, lists/dicts/tuples of those) comes back in rank order. An exception in any rank, or
a timeout, raises ``RuntimeError`` carrying every failing rank's traceback; the processes are always
reaped.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["find_free_port", "run_distributed"]


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...],
            result_path: str, backend: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    payload: dict[str, Any]
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        try:
            payload = {"ok": True, "result": fn(rank, world_size, *args)}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:  # every failure must reach the parent as text
        payload = {"ok": False, "error": traceback.format_exc()}
    tmp = result_path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, result_path)


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (),
                    timeout_s: float = 120.0, backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; results in rank order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dist-test-") as tmp:
        paths = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        port = find_free_port()
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, paths[r], backend),
                             daemon=True) for r in range(world_size)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        try:
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        finally:
            timed_out = [r for r, proc in enumerate(procs) if proc.is_alive()]
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        errors, results = [], []
        for rank, path in enumerate(paths):
            if not os.path.exists(path):
                why = f", timed out after {timeout_s:.0f} s" if rank in timed_out else ""
                errors.append(f"rank {rank}: no result (exit code {procs[rank].exitcode}{why})")
                continue
            payload = torch.load(path, weights_only=True)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {rank} raised:\n{payload['error']}")
        if errors:
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
        return results
