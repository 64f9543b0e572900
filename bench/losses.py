"""Cost of each loss relative to the plain computation it decorates, forward + backward.

    python bench/losses.py            # margins: B 1024 rows x N 10000 local columns; metric: B 512 x D 512
    python bench/losses.py --quick    # B 256 x N 2000; metric B 128 x D 128 (< 60 s)

Margin table: ``F.cross_entropy(margin(cos_theta, labels), labels)`` against plain softmax cross-entropy
on the same logits, ``F.cross_entropy(64 * cos_theta, labels)`` with the scaled logits precomputed (goal:
<= 1.3x). The reference uses the margin's scale because the scale changes the cost: at s = 64 most
``exp(logit - max)`` underflow into fp32 subnormals, which are slow on x86 CPUs. The default shape is one
rank's share of an MS1M-class run (85k classes over 8 GPUs ~ 10.6k local columns, 1024 all-gathered rows).

Rows ``fused:*`` time :func:`arcface.objectives.losses.margin_cross_entropy`, the combined margin and the
cross-entropy fused into one buffer (same value and gradient as the modular path).

Metric table: each metric-learning loss on [B, D] embeddings (8 images per identity, P x K) against the
unavoidable part of it, the pairwise distance matrix ``torch.cdist`` and its backward.

Timing: one intra-op thread by default, measured as the calling thread's CPU time
(``time.thread_time``), so that other processes competing for the cores (preemption) do not count; with
``--threads N > 1`` wall-clock time is used instead. Best (minimum) of ``--repeats`` runs after 2 warm-up
runs, each configuration interleaved with its reference in the same process. The ratio, not the
absolute time, is the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcface.head.margins import build_margin, subcenter_max  # noqa: E402
from arcface.objectives import losses as L  # noqa: E402

MARGINS = ["softmax", "sphereface", "arcface", "arcface:straight_through", "cosface", "combined",
           "arcface:filter0.4", "adaface", "curricularface", "subcenter_arcface(k=3)",
           "fused:softmax", "fused:sphereface", "fused:arcface", "fused:arcface:straight_through",
           "fused:cosface", "fused:combined", "fused:arcface:filter0.4"]


CLOCK: Callable[[], float] = time.thread_time


def time_pair(ours: Callable[[], None], ref: Callable[[], None], warmup: int, repeats: int
               ) -> tuple[float, float]:
    """Best seconds of ``ours`` and ``ref``, timed alternately."""
    for _ in range(warmup):
        ours()
        ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t0 = CLOCK()
        ref()
        t1 = CLOCK()
        ours()
        t2 = CLOCK()
        t_ref.append(t1 - t0)
        t_ours.append(t2 - t1)
    return min(t_ours), min(t_ref)


def _margin_step(name: str, cos_theta: torch.Tensor, labels: torch.Tensor, ce_labels: torch.Tensor,
                 norms: torch.Tensor) -> Callable[[], None]:
    """One fwd+bwd of margin + CE; ``labels`` has -1 rows (target elsewhere), ``ce_labels`` does not."""
    k, fused = 1, name.startswith("fused:")
    name = name.removeprefix("fused:")
    if name.startswith("subcenter"):
        margin, k = build_margin("arcface"), 3
    elif ":" in name:
        base, option = name.split(":")
        if option == "straight_through":
            margin = build_margin(base, gradient="straight_through")
        else:
            margin = build_margin(base, interclass_filtering_threshold=float(option.removeprefix("filter")))
    else:
        margin = build_margin(name)
    extra: dict[str, torch.Tensor] = {}
    if getattr(margin, "needs_embedding_norms", False):
        extra["embedding_norms"] = norms
    if getattr(margin, "needs_row_target_cos", False):
        # in the sharded classifier: every row's target cosine after the all-reduce
        extra["row_target_cos"] = cos_theta.detach().gather(1, ce_labels.unsqueeze(1)).squeeze(1)
    if k > 1:
        # k sub-centres per class: the classifier produces k times the columns, reduced by a max
        cos_k = cos_theta.detach().repeat_interleave(k, dim=1).add_(
            torch.rand(cos_theta.shape[0], cos_theta.shape[1] * k) * 1e-3).clamp_(-1, 1).requires_grad_(True)

        def step() -> None:
            cos_k.grad = None
            F.cross_entropy(margin(subcenter_max(cos_k, k), labels), ce_labels).backward()
        return step

    if fused:
        # the fused path ignores rows whose target is elsewhere (label -1) instead of computing their CE
        # against column 0: the same row count does work in both, the -1 rows skip only the target
        def step() -> None:
            cos_theta.grad = None
            L.margin_cross_entropy(cos_theta, labels, margin).backward()
        return step

    def step() -> None:
        cos_theta.grad = None
        F.cross_entropy(margin(cos_theta, labels, **extra), ce_labels).backward()
    return step


def bench_margins(batch: int, classes: int, warmup: int, repeats: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(0)
    cos_theta = (torch.rand(batch, classes, generator=g) * 2 - 1).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=g)
    labels[::10] = -1  # 10% of rows with their target on another rank, as in the sharded classifier
    norms = torch.rand(batch, generator=g) * 20 + 5
    ce_labels = labels.clamp(min=0)

    logits = (64.0 * cos_theta.detach()).requires_grad_(True)

    def reference() -> None:
        logits.grad = None
        F.cross_entropy(logits, ce_labels).backward()

    rows = []
    for name in MARGINS:
        step = _margin_step(name, cos_theta, labels, ce_labels, norms)
        ours, ref = time_pair(step, reference, warmup, repeats)
        rows.append((name, ours, ref))
        print(f"  {name:28s} {ours * 1e3:8.2f} ms  vs CE {ref * 1e3:8.2f} ms  = {ours / ref:5.2f}x",
              flush=True)
    return rows


def bench_metric(batch: int, dim: int, warmup: int, repeats: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(batch // 8).repeat_interleave(8)
    embeddings = torch.randn(batch, dim, generator=g).requires_grad_(True)
    center = L.CenterLoss(batch // 8, dim)
    dws = L.DistanceWeightedMarginLoss()
    losses: dict[str, Callable[[], torch.Tensor]] = {
        "contrastive (all pairs)": lambda: L.batch_contrastive_loss(embeddings, labels),
        "triplet semi-hard": lambda: L.triplet_loss(embeddings, labels),
        "triplet hardest": lambda: L.triplet_loss(embeddings, labels, mining="hardest"),
        "triplet random violating": lambda: L.triplet_loss(embeddings, labels, mining="random_violating"),
        "TriHard": lambda: L.batch_hard_triplet_loss(embeddings, labels),
        "TriHard soft-margin": lambda: L.batch_hard_triplet_loss(embeddings, labels, soft_margin=True),
        "lifted structured": lambda: L.lifted_structured_loss(embeddings, labels),
        "margin + distance weighted": lambda: dws(embeddings, labels),
        "center loss": lambda: center(embeddings, labels),
    }

    def reference() -> None:
        embeddings.grad = None
        torch.cdist(embeddings, embeddings).mean().backward()

    rows = []
    for name, fn in losses.items():
        def step(fn=fn) -> None:
            embeddings.grad = None
            fn().backward()
        ours, ref = time_pair(step, reference, warmup, repeats)
        rows.append((name, ours, ref))
        print(f"  {name:28s} {ours * 1e3:8.2f} ms  vs cdist {ref * 1e3:8.2f} ms  = {ours / ref:5.2f}x",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument("--batch", type=int, help="rows of the margin benchmark")
    parser.add_argument("--classes", type=int, help="local columns of the margin benchmark")
    parser.add_argument("--metric-batch", type=int, help="embeddings per metric-learning batch")
    parser.add_argument("--dim", type=int, help="embedding size of the metric benchmark")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    batch = args.batch or (256 if args.quick else 1024)
    classes = args.classes or (2000 if args.quick else 10000)
    metric_batch = args.metric_batch or (128 if args.quick else 512)
    dim = args.dim or (128 if args.quick else 512)
    repeats = args.repeats or (10 if args.quick else 12)
    for key, value in (("batch", batch), ("classes", classes), ("repeats", repeats), ("dim", dim)):
        if value < 1:
            parser.error(f"--{key} must be >= 1, got {value}")
    if metric_batch < 16 or metric_batch % 8:
        parser.error(f"--metric-batch must be a multiple of 8 and >= 16, got {metric_batch}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.threads == 1 else time.perf_counter
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {clock}, best of {repeats}")

    print(f"\nMargin softmax, fwd+bwd on cos_theta [{batch} x {classes}] fp32:")
    margin_rows = bench_margins(batch, classes, 2, repeats)
    print(f"\nMetric losses, fwd+bwd on embeddings [{metric_batch} x {dim}] fp32, K = 8 per identity:")
    metric_rows = bench_metric(metric_batch, dim, 2, repeats)

    print(f"\n| margin loss (B={batch}, N={classes}) | ms | plain CE ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, ref in margin_rows:
        flag = "" if ours / ref <= 1.3 else " (> 1.3)"
        print(f"| {name} | {ours * 1e3:.2f} | {ref * 1e3:.2f} | {ours / ref:.2f}x{flag} |")
    print(f"\n| metric loss (B={metric_batch}, D={dim}) | ms | cdist fwd+bwd ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, ref in metric_rows:
        print(f"| {name} | {ours * 1e3:.2f} | {ref * 1e3:.2f} | {ours / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
