"""Run every benchmark script in bench/ and collect their tables into bench/RESULTS.md.

    python bench/run_all.py            # the full reference sizes (tens of minutes on 2 cores)
    python bench/run_all.py --quick    # small sizes, a few minutes in all
    python bench/run_all.py --only partial_fc eval

Each script prints its own table (ours vs. the reference computation in the same run, as a ratio);
this runner only executes them one after another (never in parallel: timings would interfere) and
writes their output, with the date and the machine, to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch_version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="*", default=None, help="script names (without .py) to run")
    parser.add_argument("--output", default=str(BENCH_DIR / "RESULTS.md"), help="where to write the results")
    args = parser.parse_args(argv)

    # device_check.py is a pass/fail verification of the GPU paths, not a benchmark, and gpu_session.py
    # with train_throughput.py measure GPU-sized configurations (r100 at batch 256): run those on a GPU
    # machine (docs/gpu.md). bench/train_step.py is the CPU training-step benchmark.
    skipped = (Path(__file__).name, "device_check.py", "gpu_session.py", "train_throughput.py")
    scripts = sorted(p for p in BENCH_DIR.glob("*.py") if p.name not in skipped)
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in wanted]

    sections = []
    failures = 0
    for script in scripts:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        output = proc.stdout.strip()
        if proc.returncode != 0:
            failures += 1
            output += f"\n\nFAILED (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}"
        print(output, flush=True)
        sections.append(f"## {script.stem}\n\n`{' '.join(['python', 'bench/' + script.name] + cmd[2:])}` "
                        f"({seconds:.0f} s)\n\n```\n{output}\n```\n")

    header = (f"# Benchmark results\n\nMeasured {dt.date.today().isoformat()} on {machine_description()}"
              f"{' with --quick sizes' if args.quick else ''}.\nRegenerate with `./run.sh bench`"
              f"{' --quick' if args.quick else ''}.\n\n")
    tmp = Path(args.output + ".tmp")
    tmp.write_text(header + "\n".join(sections))
    tmp.replace(args.output)
    print(f"wrote {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
