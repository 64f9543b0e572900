"""Compile time and compiled speed of a backbone: the whole model as one graph vs each repeated block.

    python bench/compile_time.py                                   # r100, CPU, inductor, batch 2
    python bench/compile_time.py --backbone r18 --backend aot_eager
    python bench/compile_time.py --device cuda --batch 256 --amp bf16 --channels-last
    python bench/compile_time.py --quick                           # mobilefacenet_s, aot_eager: seconds

Each row is one training step of the backbone alone (forward, ``embeddings.float().square().mean()``,
backward, SGD update) compiled by ``arcface.compiling.compile_backbone`` exactly as the trainer does with
``runtime.compile_scope`` = ``model`` or ``blocks``, plus an eager row as the baseline of step time.
"compile + first step" is the wall time from the compile call to the end of the first step (tracing,
code generation, autotuning and the step itself); "ms/step" is the median of the steps after two
warm-up steps.

Every row runs in a fresh process with an empty inductor cache directory, so neither row profits from
code another row compiled; a row that does not finish within ``--row-limit`` seconds is killed and
reported as such (the ratio is then a bound).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The project root first: Python puts this script's folder (bench/) first, and bench/backbones.py would
# shadow the backbones package.
sys.path.insert(0, str(ROOT))


def measure(args: argparse.Namespace) -> dict:
    """One row, in this process: compile + first step seconds, steady ms/step, regions compiled."""
    import torch

    from arcface.compiling import compile_backbone, compile_regions
    from backbones import create_backbone

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone).to(device)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch, 3, 112, 112, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    model = backbone
    if args.scope != "eager":
        model = compile_backbone(backbone, backbone, args.scope, args.backend)

    def step() -> None:
        with autocast:
            embeddings = model(images)
        loss = embeddings.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync()
    first = time.perf_counter() - started
    times = []
    for index in range(2 + args.steps):
        started = time.perf_counter()
        step()
        sync()
        if index >= 2:
            times.append(time.perf_counter() - started)
    regions = len(compile_regions(backbone)) if args.scope == "blocks" else 1
    return {"first_s": first, "ms": 1000 * statistics.median(times), "regions": regions}


def run_row(args: argparse.Namespace, scope: str) -> dict | str:
    """``measure`` in a fresh process with a cold inductor cache; a dict, or why there is none."""
    command = [sys.executable, __file__, "--one-row", "--scope", scope, "--backbone", args.backbone,
               "--backend", args.backend, "--device", args.device, "--batch", str(args.batch), "--amp",
               args.amp, "--steps", str(args.steps)] + (["--channels-last"] if args.channels_last else [])
    with tempfile.TemporaryDirectory(prefix="bench-compile-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
               "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.row_limit)
        except subprocess.TimeoutExpired:
            return f"not finished in {args.row_limit:.0f} s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"FAILED: {tail[:200]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="a registered backbone (r100; mobilefacenet_s "
                        "with --quick)")
    parser.add_argument("--scopes", nargs="+", default=["model", "blocks"], choices=["model", "blocks"])
    parser.add_argument("--backend", default=None, choices=["inductor", "aot_eager", "eager"],
                        help="torch.compile backend (inductor; aot_eager with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny: mobilefacenet_s, aot_eager, 2 steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    parser.add_argument("--row-limit", type=float, default=600.0, help="seconds per row before it is killed")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager baseline row")
    parser.add_argument("--one-row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scope", default="blocks", choices=["eager", "model", "blocks"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.backbone = args.backbone or ("mobilefacenet_s" if args.quick else "r100")
    args.backend = args.backend or ("aot_eager" if args.quick else "inductor")
    args.steps = 2 if args.quick else args.steps
    if args.one_row:
        print(json.dumps(measure(args)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    machine = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"compile time: {args.backbone}, batch {args.batch}x3x112x112, {args.amp} autocast, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, backend {args.backend}, {machine}, "
          f"torch {torch.__version__}", flush=True)
    scopes = ([] if args.no_eager else ["eager"]) + list(args.scopes)
    results: dict[str, dict | str] = {}
    for scope in scopes:
        results[scope] = run_row(args, scope)
        print(f"  {scope}: {results[scope]}", flush=True)

    print("\n| backbone | scope | backend | regions | compile + first step s | ms/step | compile vs model "
          "| step vs model | step vs eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    model, eager = results.get("model"), results.get("eager")
    for scope, result in results.items():
        backend = "-" if scope == "eager" else args.backend
        if isinstance(result, str):
            print(f"| {args.backbone} | {scope} | {backend} | | {result} | | | | |")
            continue
        vs_model = vs_model_step = vs_eager = ""
        if isinstance(model, dict) and scope != "eager":
            vs_model = f"{result['first_s'] / model['first_s']:.2f}"
            vs_model_step = f"{result['ms'] / model['ms']:.2f}"
        elif isinstance(model, str) and model.startswith("not finished") and scope != "eager":
            vs_model = f"< {result['first_s'] / args.row_limit:.2f}"
        if isinstance(eager, dict):
            vs_eager = f"{result['ms'] / eager['ms']:.2f}"
        print(f"| {args.backbone} | {scope} | {backend} | {result['regions'] if scope != 'eager' else '-'} "
              f"| {result['first_s']:.1f} | {result['ms']:.1f} | {vs_model} | {vs_model_step} | {vs_eager} |")
    print("\nratios < 1: faster than the whole-model compile (compile, step) or than eager (step vs eager)")
    failed = [s for s, r in results.items() if isinstance(r, str) and r.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
