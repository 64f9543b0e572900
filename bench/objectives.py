"""Per-step cost of the pair / triplet objectives (global-batch mining) against the margin-softmax objective.

    python bench/objectives.py            # global batch B = 256, 512 and 1024, D = 512, N = 10000 classes
    python bench/objectives.py --quick    # B = 256 and 512, D = 512, N = 2000 (< 60 s)

Each objective is built exactly as the trainer builds it (``arcface.objectives.build_objective`` from a
config with ``loss.kind``) and timed forward + backward on one process holding the whole global batch
``[B, D]`` of fp32 embeddings, P x K composed (K = 4 images per identity, the composition the pair losses
need). The reference is the default objective, ``loss.kind = "margin_softmax"`` (ArcFace on the Partial
FC with N classes, sample rate 1), on the same embeddings in the same run: the ratio says what choosing a
pair objective costs relative to the classifier the project trains by default. The pair objectives cost
``O(B^2 D)`` and do not depend on N; the classifier costs ``O(B N D)``, so the ratio falls as N grows
(millions of identities in practice, spread over the ranks).

With W ranks, each rank of a pair objective computes the rows of its own ``B / W`` anchors against the
gathered batch (arcface.objectives.pairwise), i.e. ``1/W`` of the single-process work timed here, plus
the all-gathers.

Timing as in bench/losses.py: one intra-op thread, the calling thread's CPU time (``time.thread_time``:
other processes competing for the cores do not count), best (minimum) of ``--repeats`` runs after 2
warm-up runs, each objective interleaved with the reference.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcface.config import load_config  # noqa: E402
from arcface.objectives import Objective, build_objective  # noqa: E402
from bench.losses import time_pair  # noqa: E402

# name -> loss overrides
OBJECTIVES: dict[str, list[str]] = {
    "triplet semihard (FaceNet)": ["loss.kind=triplet"],
    "triplet batch_hard": ["loss.kind=triplet", "loss.triplet_mining=batch_hard"],
    "triplet soft_margin": ["loss.kind=triplet", "loss.triplet_mining=soft_margin"],
    "contrastive": ["loss.kind=contrastive"],
    "lifted": ["loss.kind=lifted"],
    "margin (distance-weighted)": ["loss.kind=margin"],
    "softmax+contrastive (DeepID2)": ["loss.kind=softmax+contrastive", "loss.margin=softmax", "loss.m2=0.0"],
}
REFERENCE = ["loss.kind=margin_softmax"]
K = 4


def build(overrides: list[str], dim: int, classes: int) -> Objective:
    cfg = load_config(None, [f"backbone.embedding_size={dim}", "runtime.device=cpu", *overrides])
    return build_objective(cfg, classes, 0, 1, torch.device("cpu"))


def step_fn(objective: Objective, embeddings: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        embeddings.grad = None
        objective.zero_grad(set_to_none=True)
        objective(embeddings, labels).backward()
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument("--batches", type=int, nargs="+", help="global batch sizes (multiples of 4)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--classes", type=int, help="classes of the margin-softmax reference")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    batches = args.batches or ([256, 512] if args.quick else [256, 512, 1024])
    classes = args.classes or (2000 if args.quick else 10000)
    repeats = args.repeats or (5 if args.quick else 10)
    if any(b < 2 * K or b % K for b in batches):
        parser.error(f"--batches must be multiples of {K} and >= {2 * K}, got {batches}")
    if args.dim < 2 or repeats < 1 or classes < max(batches) // K:
        parser.error("--dim must be >= 2, --repeats >= 1, --classes >= batch / 4")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, thread CPU time, best of {repeats}; one process holds the "
          f"global batch; D = {args.dim}, K = {K} images per identity; reference: margin_softmax (ArcFace, "
          f"Partial FC, N = {classes}, sample rate 1)")

    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        labels = torch.randperm(classes, generator=g)[:batch // K].repeat_interleave(K)
        embeddings = torch.randn(batch, args.dim, generator=g).requires_grad_(True)
        reference = step_fn(build(REFERENCE, args.dim, classes), embeddings, labels)
        for name, overrides in OBJECTIVES.items():
            ours, ref = time_pair(step_fn(build(overrides, args.dim, classes), embeddings, labels), reference,
                                  2, repeats)
            rows.append((batch, name, ours, ref))
            print(f"  B={batch:4d} {name:30s} {ours * 1e3:8.2f} ms  vs margin_softmax {ref * 1e3:8.2f} ms  "
                  f"= {ours / ref:5.2f}x", flush=True)

    print(f"\n| objective (fwd+bwd, D={args.dim}) | B | ms | margin_softmax ms (N={classes}) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for batch, name, ours, ref in rows:
        print(f"| {name} | {batch} | {ours * 1e3:.2f} | {ref * 1e3:.2f} | {ours / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
