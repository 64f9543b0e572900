"""``arcface-eval``: evaluate a checkpoint or ONNX model on any set of targets and write a report.

    arcface-eval --model runs/r100/checkpoints -o reports/r100 \\
        --bin data/lfw.bin --bin data/cfp_fp.bin --bin data/agedb_30.bin \\
        --ijb data/IJB_release/IJBC \\
        --megaface-probes facescrub.txt --megaface-probe-root facescrub_aligned \\
        --megaface-distractors megaface_1m.txt --megaface-distractor-root megaface_aligned

The console and the report name the model evaluated (the checkpoint a run folder resolves to, its
step and config digest) and flag results that must not be read at face value (a collapsed model, a VAL
FAR target that no threshold reaches). Data errors print one line naming the file/line (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from recordio_tools.cli_style import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    Parser,
    os_error_status,
)

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="arcface-eval", description=__doc__, epilog=EXIT_STATUS_HELP)
    p.add_argument("--model", help="checkpoint directory, run folder (its latest checkpoint), .onnx file or "
                                   "an arcface_torch weights file (backbone.pth, model.pt); not needed for "
                                   "MegaFace from feature folders")
    p.add_argument("--arch", default=None, help="architecture of an arcface_torch weights file given as "
                   "--model: r18 r34 r50 r100 r200 mbf mbf_large; optional, a check (the file's keys and "
                   "shapes name it)")
    p.add_argument("-o", "--output", required=True, help="folder for report.md, report.json, PNGs, caches")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--no-flip", action="store_true", help="embed images without the mirrored copy")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("verification packs")
    g.add_argument("--bin", action="append", default=[], metavar="[NAME=]PATH",
                   help="a .bin pack (repeatable); NAME defaults to the file stem")
    g.add_argument("--bin-dir", help="evaluate every .bin file in this folder")
    g.add_argument("--no-count-check", action="store_true",
                   help="accept packs named like a standard benchmark with a non-standard pair count")
    g = p.add_argument_group("IJB-B / IJB-C")
    g.add_argument("--ijb", action="append", default=[], metavar="ROOT", help="release root (repeatable)")
    g.add_argument("--ijb-cache", help="feature cache folder (default: OUTPUT/ijb_cache/<name>)")
    g.add_argument("--ijb-chunk", type=int, default=4096, help="images per cached feature chunk")
    g.add_argument("--no-detector-score", action="store_true", help="do not weight images by detector score")
    g.add_argument("--no-norm-quality", action="store_true",
                   help="L2-normalise each image feature before pooling (no norm-as-quality)")
    g = p.add_argument_group("MegaFace challenge 1")
    g.add_argument("--megaface-probes", help="FaceScrub list (devkit JSON or 'path [identity]' lines)")
    g.add_argument("--megaface-distractors", help="distractor list (devkit JSON or one path per line)")
    g.add_argument("--megaface-probe-root", help="aligned FaceScrub images (embedded with --model)")
    g.add_argument("--megaface-distractor-root", help="aligned MegaFace images (embedded with --model)")
    g.add_argument("--megaface-probe-features", help="existing devkit feature folder for the probes")
    g.add_argument("--megaface-distractor-features", help="existing devkit feature folder for distractors")
    g.add_argument("--megaface-suffix", default="_arcface", help="devkit feature file suffix")
    g.add_argument("--megaface-sizes", default="10,100,1000,10000,100000,1000000",
                   help="comma-separated distractor counts to report (clipped to the list length)")
    g.add_argument("--facescrub-noise", help="FaceScrub noise list (refined protocol)")
    g.add_argument("--megaface-noise", help="MegaFace distractor noise list (refined protocol)")
    g.add_argument("--megaface-fp16", action="store_true", help="store distractor features as fp16")
    return p


def _parse_bins(args: argparse.Namespace) -> list[tuple[str | None, Path]]:
    packs: list[tuple[str | None, Path]] = []
    for spec in args.bin:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        packs.append((name or None, Path(path)))
    if args.bin_dir:
        folder = Path(args.bin_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: --bin-dir is not a folder")
        found = sorted(folder.glob("*.bin"))
        if not found:
            raise FileNotFoundError(f"{folder}: no .bin packs in --bin-dir")
        packs += [(None, path) for path in found]
    return packs


def _model_fingerprint(model: str, flip: bool) -> dict:
    """What identifies the features a model produces: resolved weights file, its size and mtime, flip."""
    path = Path(model)
    if path.suffix != ".onnx":
        from arcface.checkpoint import weights_file

        path = weights_file(path)
    stat = path.stat()
    return {"weights": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "flip": flip}


def _bind_feature_folder(feature_root: Path, manifest: dict) -> None:
    """Tie a feature folder to the model and images that fill it, so a rerun resumes only its own work."""
    import json

    path = feature_root / "manifest.json"
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable feature-folder manifest ({exc})") from None
        if existing != manifest:
            raise ValueError(f"{path}: the features in this folder were made with {existing}, not "
                             f"{manifest}; use another --output or remove the folder")
        return
    feature_root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def _embed_folder(embedder, root: Path, names: list[str], feature_root: Path, suffix: str,
                  batch_size: int, fingerprint: dict, progress: bool = True) -> None:
    """Embed aligned images into devkit files, skipping images whose feature file exists (resume)."""
    from eval import megaface
    from eval.embedder import embed_encoded
    from recordio_tools.progress import progress_bar

    _bind_feature_folder(feature_root, {**fingerprint, "images": str(root.resolve()), "suffix": suffix})
    todo = [n for n in names if not megaface.feature_path(feature_root, n, suffix).is_file()]
    with progress_bar(total=len(todo), desc=f"embed {root.name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), 4096):
            block = todo[start:start + 4096]
            features = embed_encoded(embedder, ((root / n).read_bytes() for n in block), batch_size,
                                     sources=(str(root / n) for n in block), progress=bar)
            megaface.write_feature_folder(feature_root, block, features, suffix)


def _run_megaface(args: argparse.Namespace, embedder, output: Path) -> list:
    from eval import megaface

    probe_names, probe_ids = megaface.load_image_list(args.megaface_probes, with_identity=True)
    distractor_names, _ = megaface.load_image_list(args.megaface_distractors, with_identity=False)
    feature_dirs = {}
    for role, names, root_arg, feat_arg in (
            ("facescrub", probe_names, args.megaface_probe_root, args.megaface_probe_features),
            ("megaface", distractor_names, args.megaface_distractor_root, args.megaface_distractor_features)):
        if feat_arg:
            feature_dirs[role] = Path(feat_arg)
        elif root_arg:
            if embedder is None:
                raise ValueError(f"--megaface-{'probe' if role == 'facescrub' else 'distractor'}-root needs "
                                 "--model to embed the images")
            feature_dirs[role] = output / "megaface_features" / role
            _embed_folder(embedder, Path(root_arg), names, feature_dirs[role], args.megaface_suffix,
                          args.batch_size, _model_fingerprint(args.model, not args.no_flip),
                          progress=not args.quiet)
        else:
            raise ValueError(f"MegaFace {role}: give an image root or a feature folder")
    probes = megaface.read_feature_folder(feature_dirs["facescrub"], probe_names, args.megaface_suffix,
                                          progress=not args.quiet)
    dtype = np.float16 if args.megaface_fp16 else np.float32
    # A memory map keeps a 1M x 512 distractor matrix off the heap; the search reads it chunk by chunk.
    dim = megaface.read_feature(megaface.feature_path(feature_dirs["megaface"], distractor_names[0],
                                                      args.megaface_suffix)).size
    # Scratch file (hidden name, removed when done): it is never mistaken for a finished result.
    output.mkdir(parents=True, exist_ok=True)
    scratch = output / f".megaface_distractors.scratch-{os.getpid()}.npy"
    store = np.lib.format.open_memmap(scratch, mode="w+", dtype=dtype, shape=(len(distractor_names), dim))
    megaface.read_feature_folder(feature_dirs["megaface"], distractor_names, args.megaface_suffix, out=store,
                                 progress=not args.quiet)
    megaface.normalise_rows_inplace(store)
    probe_noisy = distractor_noisy = None
    if args.facescrub_noise:
        probe_noisy = megaface.noise_mask(probe_names, megaface.load_noise_list(args.facescrub_noise))
    if args.megaface_noise:
        distractor_noisy = megaface.noise_mask(distractor_names,
                                               megaface.load_noise_list(args.megaface_noise))
    try:
        sizes = sorted({min(int(s), len(distractor_names)) for s in args.megaface_sizes.split(",")
                        if s.strip()})
    except ValueError:
        raise ValueError(f"--megaface-sizes {args.megaface_sizes!r}: expected comma-separated "
                         "integers") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--megaface-sizes {args.megaface_sizes!r}: distractor counts must be >= 1")
    try:
        return megaface.evaluate_megaface(probes, probe_ids, store, sizes=sizes, probe_noisy=probe_noisy,
                                          distractor_noisy=distractor_noisy, device=args.device,
                                          progress=not args.quiet)
    finally:
        del store
        scratch.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> Path:
    from eval import ijb, verification
    from eval.embedder import build_embedder, describe_model, model_identity
    from eval.report import write_report

    output = Path(args.output)
    packs = _parse_bins(args)
    wants_megaface = bool(args.megaface_probes or args.megaface_distractors)
    if not (packs or args.ijb or wants_megaface):
        raise ValueError("nothing to evaluate: give --bin/--bin-dir, --ijb or --megaface-* targets")
    needs_model = packs or args.ijb or args.megaface_probe_root or args.megaface_distractor_root
    if needs_model and not args.model:
        raise ValueError("--model is required to embed images")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    embedder = (build_embedder(args.model, device=args.device, batch_size=args.batch_size,
                               flip=not args.no_flip, arch=args.arch) if args.model else None)
    identity = model_identity(embedder, args.model) if embedder is not None else None
    print(f"model: {describe_model(identity)}", flush=True)
    verification_results = []
    for name, path in packs:
        pack = verification.load_pack(path, name, check_count=not args.no_count_check)
        result = verification.evaluate_pack(embedder, pack, batch_size=args.batch_size,
                                            progress=not args.quiet)
        print(result.summary(), flush=True)
        verification_results.append(result)
    ijb_results = []
    for root in args.ijb:
        release_name = ijb.load_ijb(root).name
        cache = Path(args.ijb_cache) if args.ijb_cache else output / "ijb_cache" / release_name
        result = ijb.evaluate_ijb(embedder, root, cache_dir=cache, batch_size=args.batch_size,
                                  use_detector_score=not args.no_detector_score,
                                  norm_as_quality=not args.no_norm_quality, model_id=str(args.model),
                                  chunk_size=args.ijb_chunk, progress=not args.quiet)
        print(f"{result.name}: TAR@FAR=1e-4 {100 * result.tar_nearest['0.0001']:.2f}%", flush=True)
        ijb_results.append(result)
    megaface_results = _run_megaface(args, embedder, output) if wants_megaface else []
    for r in megaface_results:
        print(f"MegaFace {r.num_distractors}: rank-1 {100 * r.rank1:.2f}%", flush=True)
    report = write_report(output, identity, verification_results, ijb_results, megaface_results,
                          extra={"flip": not args.no_flip, "device": args.device})
    print(f"wrote {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (:mod:`recordio_tools.cli_style`)."""
    from arcface.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as error:  # bad arguments or input files
        print(f"arcface-eval: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # reading or writing failed while running
        print(f"arcface-eval: error: {error}", file=sys.stderr)
        return os_error_status(error)
    except KeyboardInterrupt:
        print("arcface-eval: interrupted (rerun to resume cached IJB/MegaFace features)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
