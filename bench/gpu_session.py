"""One command for a lent GPU machine: verify the CUDA paths, then measure, in order of value.

    PYTHONPATH=. python bench/gpu_session.py --device cuda --out "$OUT"     # all parts, <= 8 minutes
    PYTHONPATH=. python bench/gpu_session.py --device cuda --out "$OUT" --parts compile demo
    python bench/gpu_session.py --device cpu --quick --out /tmp/session      # the same path on CPU (tests)

Parts, each a separate process with its own time limit (a crash or a hang in one is reported and the
next one still runs), each writing its log to ``OUT/<part>.log``:

1. ``check``: ``bench/device_check.py`` (NCCL group, Partial FC vs float64, pinned/prefetched loader vs
   the CPU loader byte for byte, fp32 training vs CPU, fp16/bf16 vs fp32);
2. ``throughput``: ``bench/train_throughput.py``: r100 and r50, batch 256/128, bf16/fp16,
   channels_last (and one NCHW row), Partial FC 1M classes rate 0.1 sparse as the head: samples/s,
   peak memory, MFU against the bf16 matmul rate measured in the same run;
3. ``compile``: ``torch.compile`` (inductor): the device check's compiled run against the eager one,
   then the r100 bf16 training throughput with its residual units compiled one by one
   (``runtime.compile_scope=blocks``: the whole-model compile of r100 did not finish in 2 minutes; the
   row reports its first update, i.e. the compile time, apart);
4. ``partial_fc``: ``bench/partial_fc.py``: 1M, 10M and the largest class count whose formula fits
   (D 512, global batch 512, rate 1.0 and 0.1 sparse/dense): step time against the three matrix
   products, peak memory against ``PartialFC.memory_bytes``;
5. ``data``: ``pack_rec synth`` + ``pack_rec pack`` (all cores) on the machine's disk, then the r100
   bf16 update fed by the RecordIO loader with 8 and 16 workers: the loop's data-wait share;
6. ``demo``: ``arcface.demo`` with ``--device cuda`` on one process (pack, train, stop and resume,
   evaluate, export ONNX with the parity check).

``OUT/session.md`` gets the machine, the status and time of every part and the end of each log; the
same summary is printed last. The exit status is 1 if any part failed or ran out of time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Part:
    name: str
    limit_s: float
    commands: list[list[str]]  # run one after the other; the part fails at the first failing command
    summary_lines: int = 30


PART_NAMES = ("check", "throughput", "compile", "partial_fc", "data", "demo")
# Seconds per part on one H200, from the measured session of 2026-12-04 (startup of each process, cuDNN
# autotuning and the work itself) with room to spare; compiling r100 took over two minutes there.
CUDA_LIMITS = (60, 100, 240, 60, 45, 150)


def build_parts(args: argparse.Namespace, work: Path) -> list[Part]:
    py = sys.executable
    quick = args.quick
    workers = min(16, os.cpu_count() or 2)
    check = [py, "bench/device_check.py", "--device", args.device, "--compile-backend", "none"]
    throughput = [py, "bench/train_throughput.py", "--device", args.device]
    limits = dict(zip(PART_NAMES, args.limits))
    throughput += ["--quick"] if quick else ["--time-budget", str(max(10.0, limits["throughput"] - 30))]
    # torch.compile on its own: the device check's compiled run against the eager one, then the
    # compiled r100 training throughput (inductor; aot_eager on CPU, where inductor needs minutes), its
    # units compiled one by one: 8 small graphs instead of one of 49 units (bench/compile_time.py).
    backend = "inductor" if args.device == "cuda" else "aot_eager"
    compile_check = [
        py,
        "bench/device_check.py",
        "--device",
        args.device,
        "--checks",
        "train",
        "--amp",
        "--compile-backend",
        backend,
    ]
    compile_row = [
        py,
        "bench/train_throughput.py",
        "--device",
        args.device,
        "--row",
        "mobilefacenet_s,4,none,cl,compile:blocks" if quick else "r100,256,bf16,cl,compile:blocks",
    ]
    compile_row += ["--compile-backend", backend] + (
        ["--quick"] if quick else ["--warmup", "3", "--steps", "12"]
    )
    pfc = [py, "bench/partial_fc.py", "--device", args.device, "--rates", "1.0", "0.1", "--largest"]
    pfc += (
        ["--quick", "--classes", "10000", "--mem-limit-gb", "0.2"]
        if quick
        else ["--classes", "1000000", "10000000", "--batch", "512", "--dim", "512"]
    )
    identities, images = (12, 4) if quick else (200, 40)
    faces, rec = work / "faces", work / "train"
    data = [
        [
            py,
            "-m",
            "recordio_tools.cli",
            "synth",
            "-o",
            str(faces),
            "--identities",
            str(identities),
            "--images-per-identity",
            str(images),
            "--workers",
            str(workers),
        ],
        [
            py,
            "-m",
            "recordio_tools.cli",
            "pack",
            str(faces),
            "-o",
            str(rec),
            "--num-shards",
            "2" if quick else "8",
            "--workers",
            str(workers),
            "--shuffle",
        ],
        [
            py,
            "bench/train_throughput.py",
            "--device",
            args.device,
            "--rec",
            f"{rec}.manifest.json",
            *(
                ["--row", "mobilefacenet_s,4,none,cl", "--workers", "2", "--warmup", "1", "--steps", "2"]
                if quick
                else ["--row", "r100,256,bf16,cl", "--workers", "8", "16", "--warmup", "4", "--steps", "24"]
            ),
        ],
    ]
    demo = [
        py,
        "-m",
        "arcface.demo",
        "--device",
        args.device,
        "--nproc",
        "1",
        "--workers",
        str(workers),
        "--out",
        str(work / "demo"),
    ]
    demo += (
        [
            "--identities",
            "12",
            "--images",
            "4",
            "--heldout-identities",
            "6",
            "--pairs",
            "20",
            "--steps",
            "40",
            "--shards",
            "2",
            "--batch-size",
            "8",
            "--target",
            "0",
        ]
        if quick
        else ["--batch-size", "64"]
    )
    return [
        Part("check", limits["check"], [check]),
        Part("throughput", limits["throughput"], [throughput]),
        Part("compile", limits["compile"], [compile_check, compile_row]),
        Part("partial_fc", limits["partial_fc"], [pfc]),
        Part("data", limits["data"], data),
        Part("demo", limits["demo"], [demo], summary_lines=16),
    ]


def machine_description(device: str) -> str:
    import torch

    lines = [
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}",
        f"- CPU cores: {os.cpu_count()}",
    ]
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"{props.multi_processor_count} SMs, capability {props.major}.{props.minor}"
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            lines.append(f"- nvidia-smi: driver, max SM clock, power limit: {query.stdout.strip()}")
    return "\n".join(lines)


def run_part(part: Part, log_path: Path, deadline: float) -> tuple[str, float]:
    """Run the part's commands with its limit (never past ``deadline``); status and seconds."""
    started = time.monotonic()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    limit = min(part.limit_s, deadline - started)
    if limit < 5:
        log_path.write_text("not run: the session's time budget is spent\n")
        return "not run (budget)", 0.0
    with log_path.open("w") as log:
        for command in part.commands:
            left = started + limit - time.monotonic()
            shown = " ".join("python" if arg == sys.executable else arg for arg in command)
            log.write(f"$ {shown}\n")
            log.flush()
            command_started = time.monotonic()
            try:
                # A new session: on timeout the whole process group (loader workers, torchrun) is killed.
                proc = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                code = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                log.write(
                    f"\n[gpu_session] killed after {time.monotonic() - command_started:.0f} s "
                    f"(part limit {limit:.0f} s)\n"
                )
                return "TIMEOUT", time.monotonic() - started
            log.write(f"[gpu_session] exit {code} after {time.monotonic() - command_started:.1f} s\n")
            log.flush()
            if code != 0:
                return f"FAILED (exit {code})", time.monotonic() - started
    return "ok", time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every part still runs")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT", "gpu_session_out"),
        help="folder for the logs and session.md (default: $OUT)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=None,
        choices=PART_NAMES,
        help="run only these parts, in the fixed order (default: all)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole session (480 on CUDA); later parts are cut short first",
    )
    parser.add_argument(
        "--limits",
        type=float,
        nargs=len(PART_NAMES),
        default=None,
        metavar="S",
        help=f"per-part limits in seconds, in the order {' '.join(PART_NAMES)} "
        f"(CUDA: {' '.join(map(str, CUDA_LIMITS))})",
    )
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda" and not args.quick
    args.budget = args.budget or (480.0 if on_gpu else 1800.0)
    args.limits = args.limits or (list(CUDA_LIMITS) if on_gpu else [600] * len(PART_NAMES))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget
    title = f"# GPU session ({args.device}{', quick' if args.quick else ''})"
    header = f"{title}\n\n{machine_description(args.device)}\n"
    print(header, flush=True)
    results: list[tuple[Part, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-session-") as tmp:
        for part in build_parts(args, Path(tmp)):
            if args.parts and part.name not in args.parts:
                continue
            print(f"[{time.monotonic() - started:5.0f} s] {part.name} ...", flush=True)
            status, seconds = run_part(part, out / f"{part.name}.log", deadline)
            results.append((part, status, seconds))
            print(
                f"[{time.monotonic() - started:5.0f} s] {part.name}: {status} ({seconds:.0f} s)", flush=True
            )

    lines = [header, "| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {part.name} | {status} | {seconds:.0f} |" for part, status, seconds in results]
    for part, status, _ in results:
        log = (out / f"{part.name}.log").read_text(errors="replace").splitlines()
        lines += ["", f"## {part.name}: {status}", "", "```", *log[-part.summary_lines :], "```"]
    summary = "\n".join(lines) + "\n"
    (out / "session.md").write_text(summary)
    print(summary, flush=True)
    return 0 if all(status == "ok" for _, status, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
