"""``./run.sh demo``: the whole mission end to end on this machine's CPU, with nothing to download.

Every step is a real command a user could type; each is printed before it runs:

1. ``pack_rec synth``: synthetic face identities for training, and disjoint held-out identities
   with a pairs file for evaluation;
2. ``pack_rec pack`` into RecordIO shards, ``pack_rec verify`` and ``pack_rec info`` on them,
   ``pack_rec bin`` for a verification pack of the held-out pairs;
3. ``torchrun --nproc_per_node 2 -m arcface.train``: a step-0 checkpoint (the "before" model), then
   training with ArcFace and the sharded Partial FC (sample rate < 1, sparse update), interrupted
   part-way on purpose (``--max-steps``, as when a job's time slot ends) and resumed
   (``output.resume=auto``) to the end;
4. ``arcface-eval`` on the step-0 and the final checkpoint (report with ROC plot);
5. ``arcface-export`` to ONNX with the parity check;
6. a summary: data sizes, training samples/s, accuracy before and after, export parity, outputs.

``python -m arcface.demo --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --loss: the objective the demo trains, each a recipe delta from configs/demo_cpu.toml, and the held-out
# accuracy it must reach (chance 50%).
DEMO_RECIPES = {
    "arcface": ROOT / "configs" / "demo_cpu.toml",                 # ArcFace over the sharded Partial FC
    "triplet": ROOT / "configs" / "demo_cpu_triplet.toml",         # FaceNet: semi-hard triplets
    "center": ROOT / "configs" / "demo_cpu_center.toml",           # softmax + center loss
    "contrastive": ROOT / "configs" / "demo_cpu_contrastive.toml",  # DeepID2: softmax + contrastive
}
DEMO_TARGETS = {"arcface": 0.93, "triplet": 0.90, "center": 0.90, "contrastive": 0.90}
DEMO_RECIPE = DEMO_RECIPES["arcface"]


@dataclass
class DemoResult:
    """What the demo measured (also written to ``OUT/summary.json``)."""

    out: str
    loss: str = "arcface"
    train_images: int = 0
    train_identities: int = 0
    heldout_pairs: int = 0
    shard_bytes: int = 0
    num_shards: int = 0
    steps: int = 0
    interrupted_at: int = 0
    samples_per_second: float = 0.0
    accuracy_before: float = 0.0
    accuracy_after: float = 0.0
    accuracy_after_std: float = 0.0
    export: dict = field(default_factory=dict)
    seconds: float = 0.0


# The console scripts of setup.cfg and their modules: a source tree run with PYTHONPATH=. (no install)
# has no scripts, so the demo falls back to ``python -m MODULE``.
_TOOL_MODULES = {"pack_rec": "recordio_tools.cli", "arcface-eval": "eval.cli",
                 "arcface-export": "arcface.deploy.export", "torchrun": "torch.distributed.run"}


def _tool(name: str) -> list[str]:
    """The command line of a console script: installed beside this interpreter (the project's venv), else
    on PATH, else ``python -m`` its module."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which(name)
    if found is not None:
        return [found]
    if name in _TOOL_MODULES:
        return [sys.executable, "-m", _TOOL_MODULES[name]]
    raise SystemExit(f"demo: cannot find the '{name}' command; run ./run.sh setup first")


class Runner:
    """Prints each command (as the user would type it) before running it; stops on the first failure."""

    def __init__(self, total_steps: int, log_dir: Path) -> None:
        self.total, self.index, self.log_dir = total_steps, 0, log_dir

    def run(self, title: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.index += 1
        if argv[:2] == [sys.executable, "-m"]:
            shown = ["python", *argv[1:]]
        else:
            shown = [Path(argv[0]).name if Path(argv[0]).parent == Path(sys.executable).parent else argv[0]]
            shown += argv[1:]
        print(f"\n[{self.index}/{self.total}] {title}\n$ {shlex.join(shown)}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise SystemExit(f"demo: step {self.index} ({title}) failed with exit code {proc.returncode}")
        print(f"    ({time.perf_counter() - started:.1f} s)", flush=True)


def _mean_samples_per_second(log_file: Path, since_line: int) -> float:
    """Mean of the global samples/s the trainer logged after ``since_line`` lines of its log."""
    if not log_file.exists():
        return 0.0
    lines = log_file.read_text().splitlines()[since_line:]
    rates = [float(m.group(1)) for line in lines if (m := re.search(r"([\d.]+) samples/s", line))]
    return sum(rates) / len(rates) if rates else 0.0


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _accuracy(report_dir: Path, pack: str) -> tuple[float, float]:
    report = json.loads((report_dir / "report.json").read_text())
    for entry in report.get("verification", []):
        if entry.get("name") == pack:
            return float(entry["accuracy_mean"]), float(entry["accuracy_std"])
    raise SystemExit(f"demo: {report_dir / 'report.json'} has no verification result for {pack!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every knob's default."""

    parser = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--out", default="demo_out", help="output folder (replaced if it holds a demo)")
    parser.add_argument("--identities", type=int, default=400, help="training identities")
    parser.add_argument("--images", type=int, default=24, help="images per training identity")
    parser.add_argument("--heldout-identities", type=int, default=100, help="held-out identities")
    parser.add_argument("--pairs", type=int, default=600, help="held-out verification pairs")
    parser.add_argument("--steps", type=int, default=500, help="training updates")
    parser.add_argument("--interrupt-at", type=int, default=None,
                        help="stop at this update and resume (default: half way)")
    parser.add_argument("--nproc", type=int, default=2,
                        help="training processes (gloo on CPU; NCCL on CUDA, one GPU each)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where training runs (runtime.device); evaluation and export run on the CPU")
    parser.add_argument("--shards", type=int, default=4, help="RecordIO shards")
    parser.add_argument("--workers", type=int, default=2, help="processes for synth/pack")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per update")
    parser.add_argument("--sample-rate", type=float, default=0.5, help="Partial FC sample rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic identities")
    parser.add_argument("--loss", default="arcface", choices=list(DEMO_RECIPES),
                        help="the training objective: arcface (margin softmax over the sharded Partial FC), "
                             "triplet (FaceNet, semi-hard mining over the global batch), center (softmax + "
                             "center loss) or contrastive (DeepID2: softmax + contrastive)")
    parser.add_argument("--target", type=float, default=None,
                        help="held-out verification accuracy the trained model must reach (default: "
                             + ", ".join(f"{loss} {target:g}" for loss, target in DEMO_TARGETS.items()) + ")")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export step")
    args = parser.parse_args(argv)
    if args.target is None:
        args.target = DEMO_TARGETS[args.loss]
    if args.interrupt_at is None:
        args.interrupt_at = args.steps // 2
    if not 0 < args.interrupt_at < args.steps:
        parser.error(f"--interrupt-at must be in (0, {args.steps}), got {args.interrupt_at}")
    return args


def make_demo_data(runner: Runner, data: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The demo's data with the commands a user would type: synthetic training identities packed into
    verified RecordIO shards, and disjoint held-out identities as a verification pack. Returns the
    shards' manifest and the pack."""
    pack_rec = _tool("pack_rec")
    runner.run("synthetic training identities", [
        *pack_rec, "synth", "-o", str(data / "faces_train"), "--identities", str(args.identities),
        "--images-per-identity", str(args.images), "--seed", str(args.seed), "--workers", str(args.workers)])
    runner.run("held-out identities (disjoint) and a pairs file", [
        *pack_rec, "synth", "-o", str(data / "faces_heldout"),
        "--identities", str(args.heldout_identities),
        "--images-per-identity", "6", "--first-identity", str(args.identities), "--seed", str(args.seed),
        "--pairs", str(args.pairs), "--pairs-file", str(data / "heldout_pairs.txt"),
        "--workers", str(args.workers)])
    runner.run("pack the training set into RecordIO shards", [
        *pack_rec, "pack", str(data / "faces_train"), "-o", str(data / "train"), "--num-shards",
        str(args.shards), "--workers", str(args.workers), "--shuffle", "--seed", str(args.seed)])
    manifest = data / "train.manifest.json"
    runner.run("verify every record of every shard", [*pack_rec, "verify", str(manifest)])
    runner.run("dataset summary", [*pack_rec, "info", str(manifest)])
    runner.run("verification pack of the held-out pairs", [
        *pack_rec, "bin", str(data / "heldout_pairs.txt"), "-o", str(data / "heldout.bin")])
    return manifest, data / "heldout.bin"


def run_demo(args: argparse.Namespace) -> DemoResult:
    started = time.perf_counter()
    out = Path(args.out).resolve()
    if out.exists():
        if not (out / "demo.json").exists() and any(out.iterdir()):
            raise SystemExit(f"demo: {out} exists and is not a demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps(vars(args), indent=2))
    data, run_dir = out / "data", out / "run"
    result = DemoResult(out=str(out), loss=args.loss)
    steps = 12 - (1 if args.no_export else 0)
    runner = Runner(steps, out)
    torchrun = _tool("torchrun")
    manifest, heldout_bin = make_demo_data(runner, data, args)
    train_cmd = [*torchrun, "--standalone", "--nproc_per_node", str(args.nproc), "-m", "arcface.train",
                 str(DEMO_RECIPES[args.loss]), f"data.rec={manifest}", f"output.dir={run_dir}",
                 f"eval.bins=[{heldout_bin}]", f"schedule.total_steps={args.steps}",
                 f"runtime.batch_size={args.batch_size}", f"fc.sample_rate={args.sample_rate}",
                 f"eval.every={max(1, args.steps // 2)}",
                 f"output.checkpoint_every={max(1, args.steps // 4)}", f"runtime.device={args.device}"]
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    runner.run("the untrained model: a step-0 checkpoint", train_cmd + ["--max-steps", "0"], env)
    step0 = run_dir / "checkpoints" / "step_00000000"
    runner.run("evaluate the untrained model", [
        *_tool("arcface-eval"), "--model", str(step0), "--bin", f"heldout={heldout_bin}",
        "--output", str(out / "eval_before")])
    log_file = run_dir / "train.log"
    runner.run(f"train, interrupted at update {args.interrupt_at} (as when a job's time slot ends)",
               train_cmd + ["--max-steps", str(args.interrupt_at)], env)
    resumed_from_line = _line_count(log_file)
    runner.run("resume from the latest checkpoint and finish", train_cmd + ["output.resume=auto"], env)
    runner.run("evaluate the trained model (report with ROC plot)", [
        *_tool("arcface-eval"), "--model", str(run_dir), "--bin", f"heldout={heldout_bin}",
        "--output", str(out / "eval")])
    if not args.no_export:
        runner.run("export ONNX and check parity with the checkpoint", [
            *_tool("arcface-export"), "--model", str(run_dir), "--output", str(out / "export"),
            "--eval-pack", str(heldout_bin)])
        model_json = out / "export" / "model.json"
        if model_json.exists():
            parity = json.loads(model_json.read_text()).get("parity", {})
            sets = parity.get("sets", [])
            result.export = {
                "passed": parity.get("passed"),
                "min_cosine": min((s["min_cosine"] for s in sets), default=None),
                "max_abs_diff_rel": max((s["max_abs_diff_rel"] for s in sets), default=None),
            }

    info = json.loads(manifest.read_text())
    shards = info.get("shards", [])
    result.num_shards = len(shards)
    result.train_images = sum(int(s.get("num_images", s.get("images", 0))) for s in shards)
    result.train_identities = int(info.get("num_classes", 0))
    result.shard_bytes = sum(int(s.get("bytes", 0)) for s in shards)
    result.heldout_pairs = _line_count(data / "heldout_pairs.txt")
    result.steps, result.interrupted_at = args.steps, args.interrupt_at
    result.samples_per_second = _mean_samples_per_second(log_file, resumed_from_line)
    result.accuracy_before, _ = _accuracy(out / "eval_before", "heldout")
    result.accuracy_after, result.accuracy_after_std = _accuracy(out / "eval", "heldout")
    result.seconds = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(vars(result), indent=2) + "\n")
    return result


def print_summary(result: DemoResult, target: float) -> None:
    out = Path(result.out)
    parity = result.export
    lines = [
        "",
        "=" * 78,
        "demo summary",
        "=" * 78,
        f"training data     {result.train_images} images of {result.train_identities} synthetic identities "
        f"in {result.num_shards} RecordIO shards ({result.shard_bytes / 2**20:.1f} MiB)",
        f"evaluation data   {result.heldout_pairs} pairs of held-out identities (never seen in training)",
        f"training          {result.loss} ({DEMO_RECIPES[result.loss].name}), {result.steps} updates, "
        f"interrupted at {result.interrupted_at} and resumed; "
        f"{result.samples_per_second:.1f} samples/s (global, after resume)",
        f"verification acc. before {100 * result.accuracy_before:.2f}%  ->  after "
        f"{100 * result.accuracy_after:.2f}% +- {100 * result.accuracy_after_std:.2f}% "
        f"(target >= {100 * target:.0f}%, chance 50%)",
    ]
    if parity:
        lines.append(f"ONNX parity       {'passed' if parity['passed'] else 'FAILED'}: min cosine "
                     f"{parity['min_cosine']:.7f}, max |diff| {parity['max_abs_diff_rel']:.2e} x output "
                     "scale (batches 1 and 32, synthetic faces and random inputs)")
    lines += [
        f"outputs           {out}",
        f"  checkpoints     {out / 'run' / 'checkpoints'}",
        f"  TensorBoard     tensorboard --logdir {out / 'run'}",
        f"  training log    {out / 'run' / 'train.log'}",
        f"  eval report     {out / 'eval' / 'report.md'} (+ ROC PNG)",
        f"  ONNX model      {out / 'export' / 'model.onnx'}",
        f"total time        {result.seconds / 60:.1f} min",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_demo(args)
    print_summary(result, args.target)
    if result.accuracy_after < args.target:
        print(f"demo: held-out accuracy {100 * result.accuracy_after:.2f}% is below the target "
              f"{100 * args.target:.0f}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
