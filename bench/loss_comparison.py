"""Every training objective on the demo's data, with the same backbone and the same budget: held-out
verification accuracy and VAL@FAR=1e-3 against updates, as a table and a PNG plot.

    python bench/loss_comparison.py              # every family, 300 updates each (about an hour on 2 cores)
    python bench/loss_comparison.py --only arcface triplet_semihard --steps 500
    python bench/loss_comparison.py --quick      # 3 families, tiny data, 20 updates (a few minutes)

The data are the demo's (``arcface.demo.make_demo_data``: synthetic identities in RecordIO shards, and
600 pairs of 100 held-out identities). Every family trains ``mobilefacenet_s`` (D 128) from the same
initialisation with ``torchrun --nproc_per_node 2`` (gloo), global batch 64, the demo's SGD schedule,
verifying on the held-out pack every ``--eval-every`` updates through the trainer's own verification
(the 10-fold protocol). The families are recipe deltas: the demo recipes of ``configs/demo_cpu*.toml``
with the overrides listed in ``FAMILIES``. The curves come from the runs' TensorBoard scalars.

Writes ``--plot`` (default ``docs/losses_comparison.png``) and prints a Markdown table: final and best
held-out accuracy, VAL@FAR=1e-3 at the end, training samples/s and wall time per family.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arcface import demo  # noqa: E402

# name: (label, recipe under configs/, overrides)
FAMILIES: dict[str, tuple[str, str, list[str]]] = {
    "arcface": ("ArcFace (m2 = 0.5)", "demo_cpu.toml", []),
    "cosface": (
        "CosFace (m3 = 0.35)",
        "demo_cpu.toml",
        ["loss.margin=cosface", "loss.m2=0.0", "loss.m3=0.35"],
    ),
    "normface": (
        "NormFace (softmax on scaled cosines)",
        "demo_cpu.toml",
        ["loss.margin=normface", "loss.m2=0.0"],
    ),
    "lsoftmax": (
        "L-Softmax (m = 2)",
        "demo_cpu.toml",
        ["loss.head=lsoftmax", "loss.lsoftmax_margin=2", "loss.m2=0.0", "loss.margin=softmax"],
    ),
    "center": ("softmax + center loss", "demo_cpu_center.toml", []),
    "deepid2": ("DeepID2 (softmax + contrastive, λ = 1)", "demo_cpu_contrastive.toml", []),
    "contrastive": ("contrastive", "demo_cpu_contrastive.toml", ["loss.kind=contrastive"]),
    "triplet_semihard": ("triplet, semi-hard (FaceNet)", "demo_cpu_triplet.toml", []),
    "triplet_batch_hard": (
        "triplet, batch-hard",
        "demo_cpu_triplet.toml",
        ["loss.triplet_mining=batch_hard"],
    ),
    "lifted": ("lifted structured", "demo_cpu_triplet.toml", ["loss.kind=lifted"]),
    "margin": ("margin (distance-weighted sampling)", "demo_cpu_triplet.toml", ["loss.kind=margin"]),
}
QUICK_FAMILIES = ["arcface", "center", "triplet_semihard"]


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars that the comparison needs, as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    wanted = {
        "accuracy": "verify/heldout/accuracy",
        "val": "verify/heldout/val_at_far_1e-3",
        "samples_per_s": "train/samples_per_s",
    }
    return {
        key: [(e.step, e.value) for e in events.Scalars(tag)] for key, tag in wanted.items() if tag in tags
    }


def train_family(name: str, manifest: Path, heldout: Path, out: Path, args: argparse.Namespace) -> dict:
    label, recipe, overrides = FAMILIES[name]
    torchrun = demo._tool("torchrun")
    cmd = [
        *torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "arcface.train",
        str(ROOT / "configs" / recipe),
        f"data.rec={manifest}",
        f"output.dir={out}",
        f"eval.bins=[{heldout}]",
        f"eval.every={args.eval_every}",
        f"schedule.total_steps={args.steps}",
        f"schedule.warmup_steps={min(30, args.steps // 10)}",
        f"runtime.batch_size={args.batch_size}",
        f"output.checkpoint_every={args.steps}",
        f"runtime.log_every={args.eval_every}",
        "-q",
        *overrides,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {
            "name": name,
            "label": label,
            "error": (proc.stderr or proc.stdout)[-2000:],
            "seconds": seconds,
        }
    curves = read_curves(out)
    return {"name": name, "label": label, "seconds": seconds, **curves}


def plot(results: list[dict], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6.2))
    drawn = [r for r in results if "accuracy" in r]
    markers = "osD^vP*Xhp<>"
    for index, result in enumerate(drawn):
        style = {
            "color": plt.cm.tab20.colors[(2 * index) % 20 + (index >= 10)],
            "marker": markers[index % 12],
            "linestyle": "-" if index % 2 == 0 else "--",
            "label": result["label"],
        }
        left.plot(*zip(*[(s, 100 * v) for s, v in result["accuracy"]]), **style)
        right.plot(*zip(*[(s, 100 * v) for s, v in result["val"]]), **style)
    left.set(
        xlabel="update",
        ylabel="held-out accuracy (%)",
        title="10-fold verification accuracy",
        xlim=(0, steps),
    )
    left.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    right.set(xlabel="update", ylabel="VAL (%)", title="VAL @ FAR = 1e-3", xlim=(0, steps))
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        "Training objectives on the demo data (mobilefacenet_s, D 128, global batch 64, 2 CPU ranks)"
    )
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"families {QUICK_FAMILIES}, tiny data, 20 updates"
    )
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), default=None, help="families to run")
    parser.add_argument("--steps", type=int, default=None, help="updates per family (300; 20 with --quick)")
    parser.add_argument("--eval-every", type=int, default=None, help="updates between verifications (50)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank per update")
    parser.add_argument(
        "--plot",
        default=None,
        help="PNG to write (docs/losses_comparison.png; with --quick a temporary file)",
    )
    parser.add_argument("--json", default=None, help="also write the curves as JSON here")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="JSON",
        help="no training: the table and plot from the curves of earlier runs (--json files; a family found "
        "in several files is taken from the last)",
    )
    args = parser.parse_args(argv)
    names = args.only or (QUICK_FAMILIES if args.quick else list(FAMILIES))
    args.steps = args.steps or (20 if args.quick else 300)
    args.eval_every = args.eval_every or (10 if args.quick else 50)
    data_args = demo.parse_args(
        ["--workers", "2"]
        + (
            ["--identities", "24", "--images", "8", "--heldout-identities", "12", "--pairs", "60"]
            if args.quick
            else []
        )
    )
    started = time.perf_counter()
    if args.from_json:
        by_name = {r["name"]: r for path in args.from_json for r in json.loads(Path(path).read_text())}
        return report([by_name[name] for name in names if name in by_name], args, started)
    with tempfile.TemporaryDirectory(prefix="loss-comparison-") as tmp:
        work = Path(tmp)
        print(
            f"loss comparison: {len(names)} families x {args.steps} updates, verifying every "
            f"{args.eval_every}; data: {data_args.identities} identities x {data_args.images} images, "
            f"{data_args.pairs} held-out pairs",
            flush=True,
        )
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            manifest, heldout = demo.make_demo_data(demo.Runner(6, work), work / "data", data_args)
        results = []
        for name in names:
            result = train_family(name, manifest, heldout, work / name, args)
            results.append(result)
            if "error" in result:
                print(f"  {name}: FAILED after {result['seconds']:.0f} s\n{result['error']}", flush=True)
            else:
                final = result["accuracy"][-1][1] if result.get("accuracy") else float("nan")
                print(
                    f"  {name}: held-out accuracy {100 * final:.2f}% after {args.steps} updates "
                    f"({result['seconds']:.0f} s)",
                    flush=True,
                )
    return report(results, args, started)


def report(results: list[dict], args: argparse.Namespace, started: float) -> int:
    """Write the plot (and the JSON) and print the table; 1 if any family failed."""
    plot_path = (
        Path(args.plot)
        if args.plot
        else (
            Path(tempfile.gettempdir()) / "losses_comparison.png"
            if args.quick
            else ROOT / "docs" / "losses_comparison.png"
        )
    )
    plot(results, plot_path, args.steps)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    print(
        f"\n| objective | accuracy at {args.steps} | best accuracy (update) | VAL@FAR=1e-3 at {args.steps} "
        "| samples/s | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "accuracy" not in r:
            print(f"| {r['label']} | failed | | | | {r['seconds']:.0f} |")
            continue
        best_step, best = max(r["accuracy"], key=lambda point: point[1])
        rates = [v for _, v in r.get("samples_per_s", [])[1:]] or [v for _, v in r.get("samples_per_s", [])]
        rate = sum(rates) / len(rates) if rates else float("nan")
        print(
            f"| {r['label']} | {100 * r['accuracy'][-1][1]:.2f}% | {100 * best:.2f}% ({best_step}) | "
            f"{100 * r['val'][-1][1]:.2f}% | {rate:.1f} | {r['seconds']:.0f} |"
        )
    print(f"\nplot: {plot_path} ({time.perf_counter() - started:.0f} s in all)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
