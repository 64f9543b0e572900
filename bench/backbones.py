"""Backbone size, cost and throughput: params, GMACs, forward and forward+backward images/s.

    python bench/backbones.py               # every backbone, fp32 + channels_last, bf16 on two (CPU sizes)
    python bench/backbones.py --batch 32    # batch 32 for every backbone (~30 min on 2 cores)
    python bench/backbones.py --quick       # mobilefacenet and r18 only, batch 4, < 60 s
    python bench/backbones.py --device cuda --batch 32 --bf16-batch 32

Modes: ``fp32`` (NCHW), ``channels_last`` (fp32, NHWC memory format) and ``bf16`` (``torch.autocast``).
GMACs are counted exactly from the layer shapes (conv: out elements x in/groups x kh x kw; linear:
in x out) at 112x112. The reference in the same run is this machine's measured matmul peak: a square
fp32 (and bf16) ``torch.mm`` timed the same way; "peak %" = achieved FLOP/s (2 x MACs x images/s, x3 for
forward+backward) / matmul FLOP/s of the same dtype.

CPU defaults, reduced from the reference batch 32 to stay within ~5 minutes on 2 cores: mobilefacenet 32,
r18/r34/r50 8, r100/r200 2 (``--batch N`` sets all); bf16 runs at batch 2 (``--bf16-batch``) on
mobilefacenet and r18 only, because bf16 convolutions can be ~100x slower than fp32 on CPUs without native
bf16 support. Each measurement is one warm-up call at batch 2 and then timed calls for at least
``--min-time`` seconds (at least one). Throughput per image barely depends on the batch on CPU.

Clock: on CPU with ``--threads 1`` (the default) the thread's own CPU time (``time.thread_time``), so
other processes competing for a shared machine's cores do not count; otherwise wall time. The matmul
peak is measured with the same clock and thread count, so "peak %" compares like with like.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import create_backbone, list_backbones  # noqa: E402

CLOCK: Callable[[], float] = time.perf_counter
CPU_BATCH = {"mobilefacenet": 32, "mobilefacenet_s": 32, "r18": 8, "r34": 8, "r50": 8, "r100": 2, "r200": 2}
BF16_DEFAULT = ("mobilefacenet", "r18")


def count_macs(model: nn.Module, input_size: int = 112) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear (BN/PReLU/adds excluded)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


def _timed(fn, min_time: float, min_iters: int = 1) -> float:
    """Seconds per call of ``fn``, repeated until ``min_time`` has passed (at least ``min_iters``)."""
    iters, start = 0, CLOCK()
    while iters < min_iters or CLOCK() - start < min_time:
        fn()
        iters += 1
    return (CLOCK() - start) / iters


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, min_time: float) -> float:
    """Measured FLOP/s of a square matmul of ``size`` in ``dtype``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def run() -> None:
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    return 2 * size**3 / _timed(run, min_time)


def bench_one(name: str, mode: str, batch: int, device: torch.device, min_time: float) -> tuple[float, float]:
    """(forward images/s, forward+backward images/s) in training mode (batch-statistics BN)."""
    torch.manual_seed(0)
    model = create_backbone(name).to(device)
    images = torch.randn(batch, 3, 112, 112, device=device)
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    full_images = images
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(images)
        sync()

    def forward_backward() -> None:
        with autocast:
            embeddings = model(images)
        embeddings.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        sync()

    # warm-up (allocator, kernel selection) at batch 2: a full-batch warm-up would double the run time
    images = full_images[:2]
    forward()
    forward_backward()
    images = full_images
    return batch / _timed(forward, min_time), batch / _timed(forward_backward, min_time)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="mobilefacenet and r18 at batch 8 (< 60 s)")
    parser.add_argument("--names", nargs="+", default=None, help=f"backbones (default: {list_backbones()})")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch for every backbone (default: 32 on CUDA, on CPU {CPU_BATCH})")
    parser.add_argument("--bf16-batch", type=int, default=None,
                        help="batch for bf16 autocast (default: 2 on CPU, --batch on CUDA)")
    parser.add_argument("--bf16-names", nargs="+", default=None,
                        help=f"backbones timed in bf16 (default: {list(BF16_DEFAULT)} on CPU, all on CUDA)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: CPU-time clock)")
    args = parser.parse_args(argv)
    global CLOCK

    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if on_cpu and args.threads == 1 else time.perf_counter
    names = args.names or list_backbones()
    for name in names:
        if name not in list_backbones():
            parser.error(f"--names: unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    batches = {n: args.batch or (CPU_BATCH.get(n, 8) if on_cpu else 32) for n in list_backbones()}
    bf16_batch = args.bf16_batch or (2 if on_cpu else 32)
    bf16_names = args.bf16_names or (list(BF16_DEFAULT) if on_cpu else names)
    min_time = args.min_time
    if args.quick:
        names = args.names or ["mobilefacenet", "r18"]
        batches = {n: 4 for n in batches}
        bf16_batch, min_time, bf16_names = 2, 0.0, ["mobilefacenet"]

    mm_size, mm_time = (2048 if on_cpu else 8192), max(min_time, 0.5)
    peak = {torch.float32: matmul_peak(torch.float32, device, mm_size, mm_time)}
    if any(n in bf16_names for n in names):
        peak[torch.bfloat16] = matmul_peak(torch.bfloat16, device, mm_size, mm_time)
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    print(f"device {device} | threads {torch.get_num_threads()} | {clock} | matmul peak fp32 "
          f"{peak[torch.float32] / 1e9:.1f} GFLOP/s"
          + (f", bf16 {peak[torch.bfloat16] / 1e9:.1f} GFLOP/s" if torch.bfloat16 in peak else ""))
    header = (f"{'backbone':<14}{'params M':>9}{'GMACs':>7}  {'mode':<14}{'batch':>5}{'fwd img/s':>11}"
              f"{'fwd+bwd img/s':>15}{'fwd peak %':>11}{'f+b peak %':>11}")
    print(header)
    print("-" * len(header))
    for name in names:
        model = create_backbone(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = count_macs(model)
        del model
        modes = ["fp32", "channels_last"] + (["bf16"] if name in bf16_names else [])
        for mode in modes:
            b = bf16_batch if mode == "bf16" else batches[name]
            fwd, fwd_bwd = bench_one(name, mode, b, device, min_time)
            flops = peak[torch.bfloat16 if mode == "bf16" else torch.float32]
            fwd_frac = 2 * macs * fwd / flops
            bwd_frac = 3 * 2 * macs * fwd_bwd / flops  # backward ~ 2x forward
            print(f"{name:<14}{params:>9.2f}{macs / 1e9:>7.2f}  {mode:<14}{b:>5}{fwd:>11.1f}{fwd_bwd:>15.1f}"
                  f"{100 * fwd_frac:>10.0f}%{100 * bwd_frac:>10.0f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
