"""Deployment latency: the exported ONNX model in onnxruntime (CPU) vs PyTorch eager, same weights.

    python bench/export.py            # mobilefacenet and r100 (LResNet100E-IR) at batch 1 and 32
    python bench/export.py --quick    # mobilefacenet and r18 at batch 1 and 4 (< 60 s)

For each backbone (512-d, random weights with BN statistics calibrated on one random batch: latency does
not depend on the values) the script exports with arcface.deploy.export.export_model (TorchScript exporter +
BatchNorm folding), then times the median of
``--runs`` calls after one warm-up, for onnxruntime and PyTorch eager (fp32, inference mode), both with
``--threads`` intra-op threads (default 1). ``ratio`` = PyTorch ms / onnxruntime ms (> 1: the ONNX model
is faster). Also printed: export time, file size, parameter count, parity on the synthetic faces at that
batch. A PNG bar chart is written to ``--plot`` (default bench/export_latency.png).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcface.deploy import export  # noqa: E402
from backbones import create_backbone  # noqa: E402


def calibrate_batchnorm(model: torch.nn.Module, batch: int = 2) -> torch.nn.Module:
    """Running statistics = the statistics of one random batch, as a trained network has: a freshly
    initialised r100 has BN statistics (0, 1) that do not match its activations, and its embedding
    overflows to inf, which would make the parity column meaningless."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: one batch gives its exact statistics
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(batch, 3, 112, 112) * 2 - 1)
    return model.eval()


def run(backbones: list[str], batch_sizes: list[int], runs: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name in backbones:
        torch.manual_seed(0)
        model = calibrate_batchnorm(create_backbone(name, embedding_size=512))
        start = time.perf_counter()
        proto, _ = export.export_model(model)
        export_s = time.perf_counter() - start
        size_mb = len(proto.SerializeToString()) / 2**20
        session = export._session(proto, threads=threads)
        inputs = export.parity_inputs(batch_sizes)
        parity = export.parity_report(model, export._runner(session),
                                      {k: v for k, v in inputs.items() if k.startswith("faces")})
        for row, check in zip(export.measure_latency(model, session, batch_sizes, runs), parity["sets"]):
            rows.append({"backbone": name, "export_s": export_s, "size_mb": size_mb,
                         "params_m": export.count_parameters(proto) / 1e6, "min_cosine": check["min_cosine"],
                         **row})
            print(f"  {name} batch {row['batch']}: onnxruntime {row['onnxruntime_ms']:.1f} ms, "
                  f"pytorch {row['pytorch_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backbone | batch | onnxruntime ms | PyTorch eager ms | ratio (PyTorch/ORT) | ORT img/s | "
             "size MB | params M | export s | parity min cos |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['batch']} | {r['onnxruntime_ms']:.1f} | "
                     f"{r['pytorch_ms']:.1f} | {r['speedup_vs_pytorch']:.2f} | "
                     f"{r['onnxruntime_images_per_s']:.1f} | {r['size_mb']:.1f} | {r['params_m']:.2f} | "
                     f"{r['export_s']:.1f} | {r['min_cosine']:.7f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['backbone']}\nbatch {r['batch']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    ax.bar(x - 0.2, [r["onnxruntime_ms"] / r["batch"] for r in rows], 0.4, label="onnxruntime")
    ax.bar(x + 0.2, [r["pytorch_ms"] / r["batch"] for r in rows], 0.4, label="PyTorch eager")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms per image (CPU)")
    ax.set_title("Exported model latency per image")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="mobilefacenet + r18 at batch 1 and 4")
    parser.add_argument("--backbones", nargs="*", default=None)
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32; quick 1,4)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per cell (default 2; quick 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of both engines (default 1: on a shared 2-core machine more "
                             "threads measure the scheduler, not the engine)")
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parent / "export_latency.png"))
    args = parser.parse_args(argv)
    # r50 and r200 are left out of the default to keep it near 5 minutes on 2 cores (r100 at batch 32
    # alone costs ~3 minutes single-threaded); pass --backbones to add them.
    default = ["mobilefacenet", "r18"] if args.quick else ["mobilefacenet", "r100"]
    backbones = args.backbones or default
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4" if args.quick else "1,32")).split(",")]
    runs = args.runs or (3 if args.quick else 2)
    print(f"# ONNX export latency ({args.threads} intra-op thread(s) each, {runs} runs, median)")
    rows = run(backbones, batch_sizes, runs, args.threads)
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
