"""One command that checks the device-specific paths: CUDA + NCCL on a GPU machine, the same code on CPU.

    python bench/device_check.py --device cuda      # on a GPU machine (a few minutes)
    python bench/device_check.py --device cpu       # the same checks on CPU (fp32 only by default)

Each check compares the device against an independent reference:

1. ``partial_fc``: PartialFC on the device (rate 1; rate 0.5 with the sparse and the dense update)
   against the dense float64 computation on the CPU restricted to the columns the device sampled: loss,
   embedding gradient, weight gradient (largest error relative to the largest reference entry).
2. ``process group``: a one-rank NCCL group on CUDA (gloo on CPU): ``all_reduce`` and the autograd-aware
   all-gather give the identity.
3. ``loader``: RecordIO batches decoded by 2 worker processes (pinned memory and the prefetch stream
   on CUDA) equal the CPU loader's batches byte for byte.
4. ``train fp32``: 8 updates of ``mobilefacenet_s`` with Partial FC (rate 1) on fixed synthetic images
   track the same run on the CPU (same initial weights, same data). TF32 is turned off for it: CUDA
   convolutions use TF32 by default, which drifts ~10% from the CPU over 8 updates (measured on an H200).
5. ``train fp16`` / ``train bf16`` (``--amp``): autocast runs track the device's fp32 run loosely
   (within 5% / 15% per update: bf16 drifts by ~10% over 8 updates on CPU); fp16 starts at a loss scale
   of 1024 so that no update is skipped by the grad scaler (a skipped update shifts the run).
6. ``train compile``: ``runtime.compile`` (``--compile-backend``) tracks the device's eager run.

Prints a table; the exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# The project root first: Python puts this script's folder (bench/) first, and bench/backbones.py would
# shadow the backbones package.
sys.path.insert(0, str(ROOT))

from arcface.config import load_config  # noqa: E402
from arcface.head.margins import build_margin  # noqa: E402
from arcface.head.partial_fc import PartialFC  # noqa: E402
from arcface.head.partition import ClassPartition  # noqa: E402


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_partial_fc(device: torch.device) -> tuple[bool, str]:
    classes, dim, batch = 1000, 64, 32
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, dim, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    worst = 0.0
    for rate, update in ((1.0, "sparse"), (0.5, "sparse"), (0.5, "dense")):
        pfc = PartialFC(ClassPartition(classes, 1, 0), dim, build_margin("arcface", scale=32.0), rate, update,
                        device=device, seed=1)
        local = embeddings.clone().to(device).requires_grad_()
        loss = pfc(local, labels.to(device))
        loss.backward()
        columns = pfc.sampled_classes().cpu()
        # Reference: float64 on the CPU, the same columns, plain autograd.
        ref_embeddings = embeddings.double().requires_grad_()
        ref_weight = pfc.weight.detach().cpu().double().requires_grad_()
        targets = torch.searchsorted(columns, labels)
        cos_theta = F.linear(F.normalize(ref_embeddings), F.normalize(ref_weight[columns]))
        ref_loss = F.cross_entropy(build_margin("arcface", scale=32.0)(cos_theta, targets), targets)
        ref_loss.backward()
        worst = max(worst, abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                    _relative_error(local.grad, ref_embeddings.grad),
                    _relative_error(pfc.weight.grad.to_dense(), ref_weight.grad))
    return worst < 1e-4, f"rates 1 / 0.5 sparse / 0.5 dense: max relative error of loss and gradients " \
        f"{worst:.1e} (limit 1e-4)"


def check_process_group(device: torch.device) -> tuple[bool, str]:
    import torch.distributed as dist

    from arcface.distributed import all_gather_autograd

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        values = torch.arange(6.0, device=device).reshape(2, 3).requires_grad_()
        reduced = values.detach().clone()
        dist.all_reduce(reduced)
        gathered = all_gather_autograd(values)
        gathered.sum().backward()
        ok = torch.equal(reduced, values.detach()) and torch.equal(gathered.detach(), values.detach()) \
            and torch.equal(values.grad, torch.ones_like(values))
        return ok, f"{backend}: all_reduce and autograd all_gather over 1 rank"
    finally:
        dist.destroy_process_group()


def check_loader(device: torch.device, workdir: Path) -> tuple[bool, str]:
    from arcface.data import build_train_loader
    from bench.train_step import write_rec

    write_rec(workdir / "check", 96, 12)
    cfg = load_config(None, [f"data.rec={workdir / 'check.rec'}", "data.num_classes=12", "data.num_workers=2",
                             "runtime.batch_size=16", "data.flip=true"])
    batches = []
    for where in (torch.device("cpu"), device):
        loader = build_train_loader(cfg, 0, 1, where)
        iterator = iter(loader)
        batches.append([next(iterator) for _ in range(4)])
        loader.close()
    same = all(torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
               for a, b in zip(*batches))
    on_device = all(images.device == device for images, _ in batches[1])
    return same and on_device, f"4 batches of 16 from 2 workers, identical to the CPU loader: {same}"


def _train_losses(device: torch.device, workdir: Path, name: str, *extra: str) -> list[float]:
    from arcface.train import train

    cfg = load_config(None, [
        "data.synthetic=true", "data.synthetic_num_images=64", "data.num_classes=40",
        "backbone.name=mobilefacenet_s", "backbone.embedding_size=128", "loss.scale=32",
        "optim.lr=0.05", "optim.base_batch_size=16", "schedule.total_steps=8", "schedule.warmup_steps=0",
        "runtime.batch_size=16", f"runtime.device={device.type}", "runtime.log_every=100", "eval.every=0",
        f"output.dir={workdir / name}", "output.checkpoint_every=0", "output.tensorboard=false", *extra])
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg)["losses"]


def _compare(losses: list[float], reference: list[float], rtol: float) -> tuple[bool, str]:
    got, want = torch.tensor(losses), torch.tensor(reference)
    finite = bool(torch.isfinite(got).all())
    error = float(((got - want).abs() / want.abs()).max()) if finite else float("inf")
    shown = " ".join(f"{v:.3f}" for v in losses)  # NaN = an update skipped (fp16 grad-scaler overflow)
    return finite and error <= rtol, f"losses [{shown}], max relative difference {error:.1e} (limit {rtol:g})"


_GROUPS = {"partial_fc": "Partial FC vs float64", "process_group": "NCCL / gloo group",
           "loader": "loader vs CPU", "train": "training runs"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--amp", nargs="*", default=None, choices=["fp16", "bf16"],
                        help="autocast modes to check (default: fp16 bf16 on CUDA, none on CPU)")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "none"])
    parser.add_argument("--checks", nargs="+", default=list(_GROUPS), choices=list(_GROUPS),
                        help="which checks to run (train = fp32 vs CPU, then --amp and --compile-backend "
                        "vs fp32)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    amp_modes = args.amp if args.amp is not None else (["fp16", "bf16"] if device.type == "cuda" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device check: {device} ({name}), torch {torch.__version__}", flush=True)

    results: list[tuple[str, bool, str, float]] = []

    def run(label: str, check: Callable[[], tuple[bool, str]]) -> None:
        started = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as exc:  # a crash is a failed check, reported with the others
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append((label, ok, detail, time.perf_counter() - started))
        print(f"  {label}: {'PASS' if ok else 'FAIL'} ({detail})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "partial_fc" in args.checks:
            run("partial_fc", lambda: check_partial_fc(device))
        if "process_group" in args.checks:
            run("process group", lambda: check_process_group(device))
        if "loader" in args.checks:
            run("loader", lambda: check_loader(device, workdir))
        if "train" not in args.checks:
            amp_modes, args.compile_backend = [], "none"
        device_losses: list[float] = []

        def train_fp32() -> tuple[bool, str]:
            # Strict fp32 on the device: CUDA convolutions use TF32 by default (10-bit mantissa), which
            # drifts ~10% from the CPU over 8 updates; the trainer keeps PyTorch's defaults.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            device_losses.extend(_train_losses(device, workdir, "fp32"))
            return _compare(device_losses, _train_losses(torch.device("cpu"), workdir, "cpu"), 2e-2)

        if "train" in args.checks:
            run("train fp32 (vs CPU)", train_fp32)
        # bf16 keeps 8 significant bits, fp16 11: drift limits to match. fp16 starts at a loss scale of 1024:
        # at PyTorch's 65536 the first 4 updates of this small network overflow on an H200 and are skipped
        # (the scaler's normal start), which shifts the run against fp32 and leaves nothing to compare.
        for mode in amp_modes:
            extra = [f"runtime.amp={mode}"] + (["runtime.fp16_init_scale=1024"] if mode == "fp16" else [])
            run(f"train {mode} (vs fp32)",
                lambda mode=mode, extra=extra: _compare(_train_losses(device, workdir, mode, *extra),
                                                        device_losses, 0.15 if mode == "bf16" else 0.05))
        if args.compile_backend != "none":
            run(f"train compile {args.compile_backend} (vs eager)",
                lambda: _compare(_train_losses(device, workdir, "compiled", "runtime.compile=true",
                                               f"runtime.compile_backend={args.compile_backend}"),
                                 device_losses, 1e-2))

    print("\n| check | result | detail | seconds |\n|---|---|---|---:|")
    for label, ok, detail, seconds in results:
        print(f"| {label} | {'PASS' if ok else 'FAIL'} | {detail} | {seconds:.1f} |")
    return 0 if all(ok for _, ok, _, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
