"""Training throughput of the real loop on one device: samples/s, peak memory and MFU per configuration.

    python bench/train_throughput.py --device cuda                # r100 + r50, batch 256/128, bf16/fp16
    python bench/train_throughput.py --device cuda --row r100,256,bf16,cl,compile
    python bench/train_throughput.py --device cuda --row r100,256,bf16,cl,compile:model
    python bench/train_throughput.py --device cuda --rec data/train.manifest.json --workers 8 16
    python bench/train_throughput.py --device cpu --quick         # the same code on CPU, tiny sizes

Every row runs :func:`arcface.train.train` itself: the backbone (``runtime.amp``, ``runtime.channels_last``,
``runtime.compile``, ``runtime.compile_scope``), the sharded Partial FC as the head (``--classes`` 1M,
rate 0.1, sparse update, SGD with momentum), gradient clipping, the per-update loss check and both
optimisers. The data are synthetic uint8 images held on the device (no decoding), or with ``--rec`` a
RecordIO dataset decoded by ``--workers`` loader processes (pinned memory, prefetch stream): then the
row also reports the loop's data-wait share, the fraction of the timed updates spent waiting for the
next batch.

A row is warm-up updates (cuDNN autotuning, compilation) then timed updates; the loop syncs with the
host once per update (the loss check), so the time between two updates is the update's wall time. The
run stops after the timed updates through :class:`arcface.train.StopTraining` (no checkpoint written).

MFU (model FLOPs utilisation) = ``3 x 2 x MACs x samples/s / matmul FLOP/s``: the backbone's counted
multiply-adds per image (``bench/backbones.count_macs``; x2 FLOPs, x3 for forward + backward; the
classifier's FLOPs are not counted) over the rate of a square bf16 ``torch.mm`` measured in the same run
(fp32 on CPU, where bf16 is emulated).

Row syntax for ``--row``: ``BACKBONE,BATCH,AMP,LAYOUT[,compile[:SCOPE]]`` with AMP in none/fp16/bf16,
LAYOUT ``cl`` (channels_last) or ``nchw`` and SCOPE ``blocks`` or ``model`` (``runtime.compile_scope``;
plain ``compile`` takes the config's default, the faster to compile, see ``bench/compile_time.py``).
A row's "first update s" is the wall time to the end of its first update: startup, cuDNN autotuning and,
for compiled rows, the compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The project root first: Python puts this script's folder (bench/) first, and bench/backbones.py would
# shadow the backbones package.
sys.path.insert(0, str(ROOT))

from arcface.config import COMPILE_SCOPES, RuntimeConfig, load_config  # noqa: E402
from arcface.train import StopTraining, train  # noqa: E402
from backbones import create_backbone  # noqa: E402
from bench.backbones import count_macs, matmul_peak  # noqa: E402
from bench.partial_fc import PeakMemory  # noqa: E402


@dataclass
class Row:
    backbone: str
    batch: int
    amp: str
    channels_last: bool
    compile: bool = False
    workers: int | None = None  # None: synthetic in-memory data
    compile_scope: str = RuntimeConfig().compile_scope

    @classmethod
    def parse(cls, spec: str) -> Row:
        parts = [p.strip() for p in spec.split(",")]
        compile_spec = parts[4].split(":") if len(parts) == 5 else []
        if (
            len(parts) not in (4, 5)
            or parts[2] not in ("none", "fp16", "bf16")
            or parts[3] not in ("cl", "nchw")
            or (compile_spec and compile_spec[0] != "compile")
            or len(compile_spec) > 2
            or (len(compile_spec) == 2 and compile_spec[1] not in COMPILE_SCOPES)
            or not parts[1].isdigit()
        ):
            raise ValueError(
                f"--row {spec!r}: expected BACKBONE,BATCH,AMP,LAYOUT[,compile[:SCOPE]] with AMP in "
                "none/fp16/bf16, LAYOUT cl/nchw and SCOPE blocks/model, e.g. r100,256,bf16,cl,compile"
            )
        scope = compile_spec[1] if len(compile_spec) == 2 else RuntimeConfig().compile_scope
        return cls(parts[0], int(parts[1]), parts[2], parts[3] == "cl", bool(compile_spec),
                   compile_scope=scope)

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        data = "synthetic" if self.workers is None else f"RecordIO, {self.workers} workers"
        compiled = self.compile_scope if self.compile else "no"
        return f"{self.backbone} | {self.batch} | {self.amp} | {layout} | {compiled} | {data}"


def default_rows(quick: bool, device: torch.device) -> list[Row]:
    """The grid of the GPU session: eager rows first (cheap), compiled ones last."""
    if quick:
        return [Row("mobilefacenet_s", 4, "none", True), Row("mobilefacenet_s", 4, "none", False)]
    # Most informative first (a time budget cuts the tail): the mission's r100 in bf16 and fp16, r50, then
    # the rest of the grid. Compiled rows are asked for with --row (compiling r100 takes minutes).
    return [
        Row("r100", 256, "bf16", True),
        Row("r100", 256, "fp16", True),
        Row("r50", 256, "bf16", True),
        Row("r100", 128, "bf16", True),
        Row("r100", 256, "bf16", False),
        Row("r50", 128, "bf16", True),
        Row("r50", 256, "fp16", True),
        Row("r100", 128, "fp16", True),
        Row("r50", 128, "fp16", True),
    ]


def run_row(
    row: Row, args: argparse.Namespace, device: torch.device, workdir: Path, memory: PeakMemory
) -> dict:
    """Train ``warmup + steps`` updates of ``row``; median update time, peak memory, data-wait share."""
    total = args.warmup + args.steps
    data = (
        [f"data.rec={args.rec}", f"data.num_workers={row.workers}", "data.flip=true"]
        if row.workers is not None
        else [
            "data.synthetic=true",
            f"data.num_classes={args.classes}",
            f"data.synthetic_num_images={row.batch * (total + 2)}",
        ]
    )
    cfg = load_config(
        None,
        [
            *data,
            f"backbone.name={row.backbone}",
            f"backbone.embedding_size={args.embedding_size}",
            f"runtime.batch_size={row.batch}",
            f"runtime.amp={row.amp}",
            f"runtime.channels_last={row.channels_last}",
            f"runtime.compile={row.compile}",
            f"runtime.compile_backend={args.compile_backend}",
            f"runtime.compile_scope={row.compile_scope}",
            f"runtime.device={device.type}",
            f"fc.sample_rate={args.sample_rate}",
            "fc.update=sparse",
            "optim.grad_clip=5",
            f"schedule.total_steps={total + 20}",
            "schedule.warmup_steps=0",
            "runtime.log_every=1000000",
            "eval.every=0",
            f"output.dir={workdir}",
            "output.checkpoint_every=0",
            "output.tensorboard=false",
        ],
    )
    stamps: list[tuple[int, float]] = []  # (update index, time) of each APPLIED update

    def hook(step: int, loss: float) -> None:
        stamps.append((step, time.perf_counter()))
        if step >= total:
            raise StopTraining

    in_use = memory.reset()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own log lines would bury the table
        summary = train(cfg, on_update=hook)
    wall = time.perf_counter() - started
    # fp16: the grad scaler skips updates whose gradients overflow (the hook does not see them); a gap of
    # g updates between two applied ones counts as g updates of equal length.
    durations = [
        (t1 - t0) / (s1 - s0)
        for (s0, t0), (s1, t1) in zip(stamps, stamps[1:])
        if s0 >= args.warmup
        for _ in range(s1 - s0)
    ]
    if not durations:
        raise RuntimeError(f"{len(stamps)} of {len(summary['losses'])} updates were applied (non-finite?)")
    waits = summary["update_data_wait_seconds"][args.warmup :]
    return {
        "ms": 1000 * statistics.median(durations),
        "mean_ms": 1000 * statistics.fmean(durations),
        "peak_gb": (memory.peak() - (0 if device.type == "cuda" else in_use)) / 1e9,
        "data_wait": sum(waits) / sum(durations),
        "wall_s": wall,
        "first_s": stamps[0][1] - started if stamps else float("nan"),
        "final_loss": summary["losses"][-1],
        "skipped": len(summary["losses"]) - len(stamps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (mobilefacenet_s, batch 4, 1k classes)"
    )
    parser.add_argument(
        "--row",
        action="append",
        default=None,
        metavar="SPEC",
        help="a configuration BACKBONE,BATCH,AMP,LAYOUT[,compile[:SCOPE]] (repeatable; default: the grid)",
    )
    parser.add_argument(
        "--classes", type=int, default=None, help="Partial FC classes (1,000,000; 1,000 with --quick)"
    )
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--rec", default=None, help="RecordIO dataset: rows read it with --workers processes")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[8],
        help="loader processes per row with --rec (one row per value)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed updates first (4; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed updates (12; 2 with --quick)")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="runtime.compile_backend of compiled rows",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: rows that would start later than this are listed as not run",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    args.classes = args.classes or (1000 if args.quick else 1_000_000)
    args.warmup = args.warmup or (1 if args.quick else 4)
    args.steps = args.steps or (2 if args.quick else 12)
    try:
        rows = [Row.parse(spec) for spec in args.row] if args.row else default_rows(args.quick, device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rec:
        rows = [
            Row(r.backbone, r.batch, r.amp, r.channels_last, r.compile, workers, r.compile_scope)
            for r in rows
            for workers in args.workers
        ]
    started = time.perf_counter()

    if device.type == "cuda":
        peak_dtype, peak = "bf16", matmul_peak(torch.bfloat16, device, 8192, 1.0)
        name = torch.cuda.get_device_name(device)
    else:
        peak_dtype, peak = "fp32", matmul_peak(torch.float32, device, 1024 if args.quick else 2048, 0.5)
        name = f"CPU, {torch.get_num_threads()} threads"
    print(
        f"training throughput: {name}, torch {torch.__version__}, Partial FC {args.classes:,} classes rate "
        f"{args.sample_rate} sparse, D={args.embedding_size}, {args.warmup} warm-up + {args.steps} timed "
        f"updates per row; {peak_dtype} matmul peak {peak / 1e12:.1f} TFLOP/s (measured)",
        flush=True,
    )
    macs = {
        name: count_macs(create_backbone(name, embedding_size=args.embedding_size))
        for name in sorted({r.backbone for r in rows})
    }
    memory = PeakMemory(device)
    results: list[tuple[Row, dict | str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for index, row in enumerate(rows):
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                results.append((row, "not run (time budget)"))
                continue
            try:
                result: dict | str = run_row(row, args, device, Path(tmp) / f"row{index}", memory)
            except Exception as exc:  # one failing configuration must not hide the others
                result = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            results.append((row, result))
            if isinstance(result, dict):
                rate = row.batch / result["ms"] * 1000
                mfu = 6 * macs[row.backbone] * rate / peak
                result.update(rate=rate, mfu=mfu)
                print(
                    f"  {row.label}: {rate:,.0f} samples/s, {result['ms']:.1f} ms/update, "
                    f"MFU {100 * mfu:.1f}%, "
                    f"peak {result['peak_gb']:.1f} GB, data wait {100 * result['data_wait']:.1f}%, "
                    f"skipped updates {result['skipped']}, last loss {result['final_loss']:.2f} "
                    f"(first update {result['first_s']:.0f} s, row {result['wall_s']:.0f} s)",
                    flush=True,
                )
            else:
                print(f"  {row.label}: {result}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(
        "\n| backbone | batch | autocast | layout | compile | data | samples/s | ms/update | MFU | peak GB "
        "| data wait | first update s | row wall s |"
    )
    print("|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row, result in results:
        if isinstance(result, str):
            print(f"| {row.label} | {result} | | | | | | |")
        else:
            print(
                f"| {row.label} | {result['rate']:,.0f} | {result['ms']:.1f} | {100 * result['mfu']:.1f}% | "
                f"{result['peak_gb']:.1f} | {100 * result['data_wait']:.1f}% | {result['first_s']:.0f} | "
                f"{result['wall_s']:.0f} |"
            )
    print(
        "\nGMACs per image: "
        + ", ".join(f"{n} {m / 1e9:.2f}" for n, m in macs.items())
        + f"; MFU = 6 x MACs x samples/s / measured {peak_dtype} matmul rate ({peak / 1e12:.1f} TFLOP/s)"
    )
    failed = [r for r, res in results if isinstance(res, str) and res.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
