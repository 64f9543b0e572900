"""Step time and peak memory of the sharded Partial FC (forward + backward + optimiser step).

    python bench/partial_fc.py            # C in {100k, 1M, 2M} x D 512 x global batch 256
    python bench/partial_fc.py --quick    # C in {10k, 100k}, D 128, < 60 s

One process by default (W = 1, so one rank holds all C classes); ``--world-size W`` runs W ranks on
this machine (gloo on CPU, NCCL on W GPUs), each holding C / W classes and B / W samples, and reports
the slowest rank's step and the largest rank's memory (a W-rank step adds two all-reduces of B floats,
an all-gather of B x D and its reduce-scatter). Rates 1.0, 0.3, 0.1, sparse vs dense update, SGD
with momentum. Reference in the same run: a plain dense classifier (``F.linear`` of normalised
features and weights + ``F.cross_entropy`` + ``torch.optim.SGD``) at each C (W = 1 only). Peak memory is the
process's peak RSS growth on CPU (VmHWM, reset per configuration) or ``max_memory_allocated`` on
CUDA, next to the documented formula (``PartialFC.memory_bytes``). Configurations whose formula
exceeds ``--mem-limit-gb`` are skipped (and listed) so the benchmark cannot exhaust a shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcface.head.margins import build_margin  # noqa: E402
from arcface.head.partial_fc import PartialFC, partial_fc_memory_bytes  # noqa: E402
from arcface.head.partition import ClassPartition  # noqa: E402


class PeakMemory:
    """Peak memory since :meth:`reset`: CUDA allocator stats, or the process's VmHWM on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status("VmRSS")

    def reset(self) -> int:
        """Start a new peak window; returns the memory in use now."""
        gc.collect()
        if self.device.type == "cpu":
            try:  # hand freed heap back to the OS so RSS tracks live tensors
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (VmHWM) to now
        return self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, repeats: int, device: torch.device) -> float:
    """Median seconds per step (the median: one step in a few can stall on the OS, e.g. page reclaim)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_floor_ms(batch: int, rows: int, dim: int, args, device: torch.device) -> float:
    """The three matrix products any fp32 implementation of a step with ``rows`` sampled centres must do
    (logits forward, embedding gradient, centre gradient), timed alone: the floor of the step time."""
    generator = torch.Generator(device=device).manual_seed(1)  # drawn on the device: GBs at 10M classes
    features = torch.randn(batch, dim, generator=generator, device=device)
    centres = torch.randn(rows, dim, generator=generator, device=device)
    grad_logits = torch.randn(batch, rows, generator=generator, device=device)

    def products() -> None:
        torch.mm(features, centres.t())
        torch.mm(grad_logits, centres)
        torch.mm(grad_logits.t(), features)

    return 1000 * time_steps(products, args.warmup, args.repeats, device)


def bench_one_size(num_classes: int, dim: int, batch: int, rates: list[float], args, device: torch.device,
                   memory: PeakMemory, world_size: int = 1, rank: int = 0) -> list[dict]:
    """Rows of one class count. With ``world_size > 1`` (inside a process group) this rank holds its
    shard and ``batch / world_size`` samples of the same global batch; no dense reference is run."""
    rows: list[dict] = []
    generator = torch.Generator().manual_seed(0)
    local = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    embeddings = torch.randn(batch, dim, generator=generator)[local].to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)[local].to(device)
    pfc = PartialFC(ClassPartition(num_classes, world_size, rank), dim, build_margin("arcface"),
                    device=device, seed=0, check_labels=False)
    gib = 1024 ** 3

    # Reference: the dense classifier, plain PyTorch.
    # weights, normalised copy, gradient, momentum + cos_theta, logits and softmax (fp32)
    ref_mb = (4 * 4 * num_classes * dim + 12 * batch * num_classes) / 2 ** 20
    ref_ms = float("nan")
    if world_size == 1 and ref_mb * 2 ** 20 <= args.mem_limit_gb * gib:
        weight = nn.Parameter(pfc.weight.detach().clone())
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        margin = build_margin("arcface")

        def ref_step(optimizer: torch.optim.Optimizer = optimizer, weight: nn.Parameter = weight) -> None:
            optimizer.zero_grad()
            cos_theta = F.linear(F.normalize(embeddings), F.normalize(weight))
            F.cross_entropy(margin(cos_theta, labels), labels).backward()
            optimizer.step()

        ref_ms = 1000 * time_steps(ref_step, args.warmup, args.repeats, device)
        del weight, optimizer, ref_step  # the closure's defaults hold them too
        gc.collect()

    for rate in rates:
        for update in (("sparse",) if rate == 1.0 else ("sparse", "dense")):
            pfc.set_sampling(rate, update)
            formula = pfc.memory_bytes(batch, "sgd")
            total = sum(formula.values())
            row = {"C": num_classes, "rate": rate, "update": update if rate < 1.0 else "-",
                   "rows": pfc.num_sample, "formula_mb": total / 2 ** 20, "ref_ms": ref_ms}
            if total > args.mem_limit_gb * gib:
                row.update(ms=float("nan"), peak_mb=float("nan"), skipped=True)
                rows.append(row)
                continue
            if update == "sparse":  # the same sampled rows for both updates
                floor_ms = matmul_floor_ms(batch, pfc.num_sample, dim, args, device)
            row["matmul_ms"] = floor_ms
            optimizer = pfc.build_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
            in_use = memory.reset()

            def step(optimizer: torch.optim.Optimizer = optimizer) -> None:
                optimizer.zero_grad()
                pfc(embeddings, labels).backward()
                optimizer.step()

            try:
                row["ms"] = 1000 * time_steps(step, args.warmup, args.repeats, device)
            except torch.OutOfMemoryError:  # the formula under-counted: say so in the table, go on
                del optimizer, step
                pfc.weight.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                row.update(ms=float("nan"), peak_mb=float("nan"), skipped=True,
                           reason=f"out of memory (formula {total / 2 ** 30:.1f} GiB)")
                rows.append(row)
                if rank == 0:
                    print(f"  C={num_classes:>9,} rate={rate:<4} {row['update']:<6} {row['reason']}",
                          flush=True)
                continue
            # The shard was resident before the window opened; everything else is growth within it.
            row["peak_mb"] = (memory.peak() - in_use + formula["weights"]) / 2 ** 20
            row["skipped"] = False
            rows.append(row)
            if rank == 0:
                print(f"  C={num_classes:>9,} rate={rate:<4} {row['update']:<6} {row['ms']:9.1f} ms "
                      f"peak {row['peak_mb']:8.0f} MB (formula {row['formula_mb']:8.0f} MB)"
                      + (" (rank 0)" if world_size > 1 else ""), flush=True)
            del optimizer, step  # the closure's default holds the optimiser (and its state) too
            pfc.weight.grad = None
            gc.collect()
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    print("| classes | rate | update | sampled rows | step ms | dense ref ms | ours / ref | matmuls ms | "
          "step / matmuls | peak MB | formula MB | peak / formula |")
    print("|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["skipped"]:
            print(f"| {r['C']:,} | {r['rate']} | {r['update']} | {r['rows']:,} | "
                  f"{r.get('reason', 'skipped (formula > limit)')} | "
                  f"| | | | | {r['formula_mb']:.0f} | |")
            continue
        ratio = r["ms"] / r["ref_ms"] if not math.isnan(r["ref_ms"]) else float("nan")
        print(f"| {r['C']:,} | {r['rate']} | {r['update']} | {r['rows']:,} | {r['ms']:.1f} | "
              f"{r['ref_ms']:.1f} | {ratio:.2f} | {r['matmul_ms']:.1f} | {r['ms'] / r['matmul_ms']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['formula_mb']:.0f} | {r['peak_mb'] / r['formula_mb']:.2f} |")


def print_goals(rows: list[dict]) -> None:
    def find(c: int, rate: float, update: str) -> dict | None:
        for r in rows:
            if r["C"] == c and r["rate"] == rate and r["update"] == update and not r["skipped"]:
                return r
        return None

    sizes = sorted({r["C"] for r in rows})
    if len(sizes) < 2:
        return
    small = sizes[0]
    print("\nTargets:")
    b, c = find(small, 0.1, "sparse"), find(small, 1.0, "-")
    for big in sizes[1:]:
        a, d = find(big, 0.1, "sparse"), find(big, 0.1, "dense")
        if a and b:
            print(f"  rate 0.1 sparse, step time at {big:,} / at {small:,} classes: {a['ms'] / b['ms']:.2f}x "
                  f"(goal <= 1.5x; the sampled rows also grow {big // small}x)")
        if a and c and big == 10 * small:
            print(f"  same sampled rows: {big:,} @ 0.1 sparse / {small:,} @ 1.0: {a['ms'] / c['ms']:.2f}x "
                  f"(a step costs O(sampled rows), not O(C))")
        if a and d:
            print(f"  {big:,} classes @ 0.1: dense update / sparse update: {d['ms'] / a['ms']:.2f}x "
                  f"(goal >= 3x; at most {d['ms'] / a['matmul_ms']:.2f}x here even if everything but the "
                  f"three matrix products, {a['matmul_ms']:.0f} ms, were free)")


def run_sizes(classes: list[int], dim: int, args, device: torch.device, setting: str, world_size: int = 1,
              rank: int = 0) -> list[dict]:
    """Print the run's header (rank 0; ``setting`` says how it runs) and bench every class count."""
    if rank == 0:
        print(f"Partial FC benchmark: {setting}, device {device.type}, torch {torch.__version__}, D={dim}, "
              f"global batch {args.batch}, SGD momentum, {args.warmup} warm-up + median of {args.repeats} "
              f"timed steps, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}",
              flush=True)
    memory = PeakMemory(device)
    rows: list[dict] = []
    for num_classes in classes:
        rows.extend(bench_one_size(num_classes, dim, args.batch, args.rates, args, device, memory,
                                   world_size, rank))
        gc.collect()
    return rows


def _distributed_worker(rank: int, world_size: int, port: int, classes: list[int], dim: int, args,
                        use_cuda: bool) -> None:
    """One rank of ``--world-size W``: its shard of every configuration; rank 0 prints the slowest
    rank's time and the largest rank's peak memory."""
    import torch.distributed as dist

    threads = max(1, args.total_threads // world_size)
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        setting = (f"W={world_size} ranks ({dist.get_backend()}), {threads} thread(s) and "
                   f"{args.batch // world_size} samples per rank")
        rows = run_sizes(classes, dim, args, device, setting, world_size, rank)
        every_rank: list[list[dict] | None] = [None] * world_size
        dist.all_gather_object(every_rank, rows)
        if rank == 0:
            merged = []
            for per_rank in zip(*every_rank):  # type: ignore[arg-type]
                row = dict(per_rank[0])
                if not row["skipped"]:
                    for key in ("ms", "peak_mb", "matmul_ms", "formula_mb"):
                        row[key] = max(r[key] for r in per_rank)
                merged.append(row)
            print("\nPer rank (the slowest rank's step, the largest rank's memory; C / W classes per rank):")
            print_table(merged)
            print_goals(merged)
    finally:
        dist.destroy_process_group()


def largest_classes(limit_bytes: float, dim: int, batch: int, world_size: int, step: int) -> int:
    """The largest multiple of ``step`` classes (over ``world_size`` ranks) whose per-rank formula memory
    at rate 0.1 with the sparse update and SGD stays within ``limit_bytes`` (0 if none does)."""
    def fits(classes: int) -> bool:
        per_rank = -(-classes // world_size)
        return sum(partial_fc_memory_bytes(per_rank, dim, 0.1, "sparse", batch).values()) <= limit_bytes

    low, high = 0, step
    while fits(high):  # grow geometrically, then bisect between the last fit and the first miss
        low, high = high, 2 * high
    while high - low > step:
        middle = (low + high) // 2 // step * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class counts")
    parser.add_argument("--dim", type=int, default=None, help="embedding size (512; 128 with --quick)")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--rates", type=float, nargs="*", default=[1.0, 0.3, 0.1])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps, median reported (3; 5 with "
                        "--quick)")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="skip configurations whose formula memory exceeds this (8 on CPU; on CUDA "
                        "90%% of the device's free memory)")
    parser.add_argument("--largest", action="store_true",
                        help="also run the largest class count (a multiple of 100k; 10k with --quick) whose "
                        "formula memory at rate 0.1, sparse update fits in --mem-limit-gb")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--world-size", type=int, default=1,
                        help="ranks (processes on this machine: gloo on CPU, NCCL with one GPU each); each "
                        "holds C / W classes and B / W samples; CPU threads are split between them")
    args = parser.parse_args(argv)
    classes = args.classes or ([10_000, 100_000] if args.quick else [100_000, 1_000_000, 2_000_000])
    dim = args.dim or (128 if args.quick else 512)
    args.repeats = args.repeats or (5 if args.quick else 3)
    if any(c < 1 for c in classes) or dim < 1 or args.batch < 1:
        parser.error("--classes, --dim and --batch must be positive")
    if any(not 0 < r <= 1 for r in args.rates):
        parser.error("--rates must be in (0, 1]")
    if args.world_size < 1 or args.batch % args.world_size:
        parser.error("--world-size must be >= 1 and divide --batch")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.mem_limit_gb is None:
        args.mem_limit_gb = 0.9 * torch.cuda.mem_get_info(0)[0] / 1024 ** 3 if use_cuda else 8.0
    if args.largest:
        largest = largest_classes(args.mem_limit_gb * 1024 ** 3, dim, args.batch, args.world_size,
                                  10_000 if args.quick else 100_000)
        print(f"largest class count whose formula at rate 0.1 (sparse) fits in {args.mem_limit_gb:.1f} GiB "
              f"per rank: {largest:,}", flush=True)
        classes = sorted(set(classes) | {largest})
    if args.world_size > 1:
        if use_cuda and torch.cuda.device_count() < args.world_size:
            parser.error(f"--world-size {args.world_size} needs as many GPUs "
                         f"({torch.cuda.device_count()} here)")
        args.total_threads = torch.get_num_threads()
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        torch.multiprocessing.spawn(_distributed_worker, args=(args.world_size, port, classes, dim, args,
                                                               use_cuda), nprocs=args.world_size)
        return 0
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    rows = run_sizes(classes, dim, args, device, f"W=1 (one process), {torch.get_num_threads()} threads")
    print_table(rows)
    print_goals(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
