"""MegaFace challenge 1: devkit feature files and our own identification / verification evaluation.

Devkit feature file (FORMATS.md section 6): OpenCV matrix layout, four little-endian int32
``rows = D, cols = 1, elem_size = 4, type = 5 (CV_32F)`` then ``D`` float32. One file per image, named
``<image path><suffix>.bin`` under a feature root that mirrors the image tree.

Our evaluation (no devkit needed), on L2-normalised features with cosine similarity:

* **identification**: for every FaceScrub probe ``p`` and every other image ``g`` of the same identity,
  ``g`` is put in a gallery with the ``N`` distractors; the rank of ``g`` is 1 + the number of
  distractors scoring at least ``cos(p, g)`` (ties count against the probe). Rank-1 and the CMC
  are averaged over all such (probe, mate) searches, for each distractor count (10 .. 1M; the first
  ``N`` of the distractor list).
* **verification**: genuine pairs = FaceScrub pairs of the same identity, impostor pairs = every probe
  against every distractor; TAR at FAR 1e-6 (and others).
* **refined protocol**: noisy probes are replaced by their identity centre (mean of the identity's
  clean features); noisy distractors can never match. The devkit does the latter with an extra feature
  dimension (0 for clean, a large value for noisy) under L2 distance; dropping them is the same
  ranking, and :func:`write_devkit_features` writes the extra dimension for the devkit.

The search streams the distractors in chunks (``[P, chunk]`` similarity blocks), keeping only the
top-``k`` distractor scores per probe and the global top impostor scores needed for the lowest FAR,
so memory is bounded by one chunk whatever ``N`` is; the distractors themselves may be a memory map.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval import metrics

__all__ = ["FEATURE_HEADER", "NOISE_VALUE", "write_feature", "read_feature", "feature_path",
           "write_feature_folder", "read_feature_folder", "load_image_list", "load_noise_list", "noise_mask",
           "normalise_rows_inplace",
           "refine_probes", "SearchResult", "search_distractors", "MegaFaceResult", "evaluate_megaface",
           "write_devkit_features", "overlapping_identities"]

FEATURE_HEADER = struct.Struct("<4i")
CV_32F = 5
NOISE_VALUE = 100.0  # the devkit's "never matches" extra dimension for noisy distractors


# ----------------------------------------------------------------------------- devkit feature files
def write_feature(path: str | os.PathLike[str], vector: np.ndarray) -> None:
    """Write one devkit feature file atomically (temporary name, then rename)."""
    vector = np.asarray(vector, dtype="<f4").ravel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(FEATURE_HEADER.pack(vector.size, 1, 4, CV_32F))
        handle.write(vector.tobytes())
    os.replace(tmp, path)


def read_feature(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one devkit feature file; errors name the file and what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read feature file ({exc.strerror or exc})") from None
    if len(data) < FEATURE_HEADER.size:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the 16-byte matrix header")
    rows, cols, elem_size, cv_type = FEATURE_HEADER.unpack_from(data)
    if cols != 1 or elem_size != 4 or cv_type != CV_32F or rows <= 0:
        raise ValueError(f"{path}: header rows={rows} cols={cols} elem_size={elem_size} type={cv_type}; "
                         f"expected a D x 1 CV_32F matrix (cols=1, elem_size=4, type=5)")
    if len(data) != FEATURE_HEADER.size + 4 * rows:
        raise ValueError(f"{path}: {len(data)} bytes, expected {FEATURE_HEADER.size + 4 * rows} for "
                         f"{rows} float32 values")
    return np.frombuffer(data, dtype="<f4", offset=FEATURE_HEADER.size).astype(np.float32)


def feature_path(root: str | os.PathLike[str], image_name: str, suffix: str) -> Path:
    """``<root>/<image path><suffix>.bin`` (the devkit's naming)."""
    return Path(root) / f"{image_name}{suffix}.bin"


def write_feature_folder(root: str | os.PathLike[str], image_names: Sequence[str], features: np.ndarray,
                         suffix: str = "_arcface") -> None:
    """Write one devkit file per image (existing files are replaced atomically)."""
    if len(image_names) != features.shape[0]:
        raise ValueError(f"{len(image_names)} names for {features.shape[0]} features")
    for name, vector in zip(image_names, features):
        write_feature(feature_path(root, name, suffix), vector)


def read_feature_folder(root: str | os.PathLike[str], image_names: Sequence[str], suffix: str = "_arcface",
                        dtype: np.dtype | str = np.float32, out: np.ndarray | None = None,
                        progress: bool = False) -> np.ndarray:
    """Read the devkit files of ``image_names`` into ``[N, D]`` (``out`` may be a memmap; fp16 halves it)."""
    from recordio_tools.progress import progress_bar

    names = list(image_names)
    if not names:
        raise ValueError(f"{root}: empty image list")
    first = read_feature(feature_path(root, names[0], suffix))
    if out is None:
        out = np.empty((len(names), first.size), dtype=dtype)
    elif out.shape != (len(names), first.size):
        raise ValueError(f"output array shape {out.shape} != {(len(names), first.size)}")
    for index, name in enumerate(progress_bar(names, desc=f"read {Path(root).name}", unit="file",
                                              disable=not progress)):
        vector = first if index == 0 else read_feature(feature_path(root, name, suffix))
        if vector.size != first.size:
            raise ValueError(f"{feature_path(root, name, suffix)}: {vector.size} values, the first file "
                             f"had {first.size}")
        out[index] = vector
    return out


# ----------------------------------------------------------------------------- lists
def load_image_list(path: str | os.PathLike[str], with_identity: bool) -> tuple[list[str], list[str]]:
    """Image names (and identities) from a devkit JSON (``{"path": [...], "id": [...]}``) or a text file
    (``relative/path[<whitespace>identity]`` per line; without an identity column the parent folder
    name is the identity, as in FaceScrub's ``Name/Name_123.png`` tree)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read image list ({exc.strerror or exc})") from None
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), list):
            raise ValueError(f"{path}: expected a JSON object with a 'path' list")
        names = [str(p) for p in obj["path"]]
        ids = [str(i) for i in obj["id"]] if "id" in obj else [Path(n).parent.name for n in names]
        if len(ids) != len(names):
            raise ValueError(f"{path}: {len(names)} paths but {len(ids)} ids")
    else:
        names, ids = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{path} line {number}: expected 'path [identity]', "
                                 f"got {len(fields)} fields")
            names.append(fields[0])
            ids.append(fields[1] if len(fields) == 2 else Path(fields[0]).parent.name)
    if with_identity and any(not i for i in ids):
        bad = next(n for n, i in zip(names, ids) if not i)
        raise ValueError(f"{path}: image {bad!r} has no identity (no id column, no parent folder)")
    if not names:
        raise ValueError(f"{path}: no images listed")
    return names, ids


def load_noise_list(path: str | os.PathLike[str]) -> set[str]:
    """Noise list: one image per line; matched against a list entry's full name or its base name."""
    path = Path(path)
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read noise list ({exc.strerror or exc})") from None


def noise_mask(names: Sequence[str], noise: set[str]) -> np.ndarray:
    """True for list entries on the noise list (by full name or base name)."""
    return np.array([n in noise or os.path.basename(n) in noise for n in names], dtype=bool)


def refine_probes(features: np.ndarray, identities: Sequence[str], noisy: np.ndarray) -> np.ndarray:
    """Replace noisy probes by their identity centre (normalised mean of its clean features)."""
    features = metrics.l2_normalize(features)
    identities = np.asarray(identities)
    out = features.copy()
    for identity in np.unique(identities[noisy]):
        members = identities == identity
        clean = members & ~noisy
        if not clean.any():
            raise ValueError(f"FaceScrub identity {identity!r}: every image is on the noise list, no "
                             "clean centre to replace them with")
        out[members & noisy] = metrics.l2_normalize(features[clean].mean(axis=0, keepdims=True))[0]
    return out


# ----------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """What the distractor stream leaves behind for each prefix size ``N``."""

    num_distractors: int
    top_scores: np.ndarray        # [P, k] highest distractor scores per probe (descending)
    impostor_top: np.ndarray      # global highest probe-x-distractor scores (descending)


def search_distractors(probes: np.ndarray, distractors: np.ndarray, sizes: Sequence[int] | None = None,
                       top_k: int = 10, impostor_keep: int = 0, chunk_size: int = 16384,
                       valid: np.ndarray | None = None, device: str | torch.device = "cpu",
                       progress: bool = False) -> list[SearchResult]:
    """Stream ``distractors`` ``[N, D]`` (array or memmap, fp32/fp16, L2-normalised) past ``probes``.

    For each prefix size in ``sizes`` (default: all of them) returns the per-probe top-``k`` scores and
    the global top-``impostor_keep`` scores. ``valid`` marks distractors that may match (refined
    protocol); invalid ones are skipped but still count towards the prefix position.
    """
    from recordio_tools.progress import progress_bar

    device = torch.device(device)
    total = distractors.shape[0]
    sizes = sorted(set(sizes or [total]))
    if sizes[0] < 1 or sizes[-1] > total:
        raise ValueError(f"distractor sizes {sizes} must be within 1..{total}")
    if distractors.shape[1] != probes.shape[1]:
        raise ValueError(f"probe dimension {probes.shape[1]} != distractor dimension {distractors.shape[1]}")
    probe_t = torch.from_numpy(np.ascontiguousarray(probes, dtype=np.float32)).to(device)
    num_probes = probe_t.shape[0]
    top = torch.full((num_probes, top_k), -float("inf"), device=device)
    impostor = torch.empty(0, device=device)
    floor = -float("inf")  # the last kept impostor score once the global list is full
    results: list[SearchResult] = []
    bar = progress_bar(total=sizes[-1], desc="distractor search", unit="img", unit_scale=True,
                       disable=not progress)
    position = 0
    warm = False  # True once every probe has k scores and the impostor list is full
    for size in sizes:
        while position < size:
            # A small first chunk fills the running cut-offs cheaply; after that a dense selection is
            # never needed again.
            stop = min(position + (chunk_size if warm else min(chunk_size, _WARMUP_CHUNK)), size)
            block = np.asarray(distractors[position:stop])
            if valid is not None:
                block = block[valid[position:stop]]
            bar.update(stop - position)
            position = stop
            if block.shape[0] == 0:
                continue
            block_t = torch.from_numpy(np.ascontiguousarray(block)).to(device, dtype=torch.float32)
            scores = probe_t @ block_t.T
            if warm:
                top, floor, impostor = _merge_sparse(scores, top, floor, impostor, impostor_keep)
                continue
            k = min(top_k, scores.shape[1])
            chunk_top = torch.topk(scores, k, dim=1).values
            top = torch.topk(torch.cat([top, chunk_top], dim=1), top_k, dim=1).values
            if impostor_keep:
                merged = torch.cat([impostor, scores.ravel()])
                impostor = torch.topk(merged, min(impostor_keep, merged.numel())).values
                if impostor.numel() >= impostor_keep:
                    floor = float(impostor[-1])
            warm = bool(torch.isfinite(top[:, -1]).all()) and (not impostor_keep
                                                               or impostor.numel() >= impostor_keep)
        results.append(SearchResult(int(size), top.cpu().numpy(), impostor.cpu().numpy()))
    bar.close()
    return results


_WARMUP_CHUNK = 1024


def _merge_sparse(scores: torch.Tensor, top: torch.Tensor, floor: float, impostor: torch.Tensor,
                  impostor_keep: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Merge a ``[P, C]`` score block into full running lists, selecting only the scores that can enter.

    A score can change a probe's top-``k`` only if it exceeds that probe's current k-th best, and the
    global impostor list only if it exceeds its last entry (``floor``). Once the lists are full those
    scores are a small fraction of the block, so one vectorised comparison finds them and the sorts run
    on a handful of values per row instead of a ``topk`` over every row (which costs more than the
    matrix product). Scores equal to a cut-off change no kept value, so the result is exact.
    """
    kth = top[:, -1]
    cut = torch.clamp(kth, max=floor) if impostor_keep else kth
    rows, cols = torch.nonzero(scores > cut[:, None], as_tuple=True)
    if rows.numel() == 0:
        return top, floor, impostor
    values = scores[rows, cols]
    if impostor_keep:
        candidates = values[values > floor]
        if candidates.numel():
            impostor = torch.topk(torch.cat([impostor, candidates]), impostor_keep).values
            floor = float(impostor[-1])
    enters = values > kth[rows]
    rows, values = rows[enters], values[enters]
    if rows.numel():
        # nonzero() lists rows in ascending order: group the entering scores per row into a padded
        # [rows_hit, width] block and merge it with those rows' current lists.
        hit, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel(), device=rows.device) - torch.repeat_interleave(starts, counts)
        width = int(counts.max())
        padded = torch.full((hit.numel(), width), -float("inf"), device=scores.device)
        padded[torch.repeat_interleave(torch.arange(hit.numel(), device=rows.device), counts), slot] = values
        top = top.clone()
        top[hit] = torch.topk(torch.cat([top[hit], padded], dim=1), top.shape[1], dim=1).values
    return top, floor, impostor


# ----------------------------------------------------------------------------- evaluation
@dataclass
class MegaFaceResult:
    num_distractors: int
    num_searches: int
    rank1: float
    cmc: list[float]
    tar_at_far: dict[str, float]
    thresholds: dict[str, float]
    genuine_scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    impostor_top: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}


def _probe_pairs(identities: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All ordered (probe, mate) index pairs of the same identity, probe != mate."""
    identities = np.asarray(identities)
    probes, mates = [], []
    for identity in np.unique(identities):
        members = np.nonzero(identities == identity)[0]
        if members.size < 2:
            continue
        p, g = np.meshgrid(members, members, indexing="ij")
        off_diagonal = p != g
        probes.append(p[off_diagonal])
        mates.append(g[off_diagonal])
    if not probes:
        raise ValueError("no FaceScrub identity has two images: nothing to search")
    return np.concatenate(probes), np.concatenate(mates)


def evaluate_megaface(probe_features: np.ndarray, probe_identities: Sequence[str], distractors: np.ndarray,
                      sizes: Sequence[int] | None = None, probe_noisy: np.ndarray | None = None,
                      distractor_noisy: np.ndarray | None = None, max_rank: int = 10,
                      fars: Sequence[float] = (1e-6,), chunk_size: int = 16384,
                      device: str | torch.device = "cpu", progress: bool = False) -> list[MegaFaceResult]:
    """Rank-1/CMC identification and TAR@FAR verification for each distractor count in ``sizes``.

    ``distractors`` must be L2-normalised (see :func:`normalise_rows_inplace` for memmaps); probes are
    normalised here and refined with ``probe_noisy``.
    """
    identities = list(probe_identities)
    if len(identities) != probe_features.shape[0]:
        raise ValueError(f"{len(identities)} probe identities for {probe_features.shape[0]} features")
    probes = (refine_probes(probe_features, identities, probe_noisy) if probe_noisy is not None
              and probe_noisy.any() else metrics.l2_normalize(probe_features))
    valid = None if distractor_noisy is None else ~np.asarray(distractor_noisy, dtype=bool)
    sizes = sorted(set(sizes or [distractors.shape[0]]))
    clean_counts = [size if valid is None else int(valid[:size].sum()) for size in sizes]
    impostor_keep = int(np.floor(max(fars) * probes.shape[0] * max(clean_counts))) + 1
    searches = search_distractors(probes, distractors, sizes, top_k=max_rank, impostor_keep=impostor_keep,
                                  chunk_size=chunk_size, valid=valid, device=device, progress=progress)
    probe_index, mate_index = _probe_pairs(identities)
    genuine = np.einsum("ij,ij->i", probes[probe_index].astype(np.float64),
                        probes[mate_index].astype(np.float64))
    # Genuine FaceScrub pairs counted once (unordered) for verification.
    unordered = probe_index < mate_index
    results = []
    for search, clean in zip(searches, clean_counts):
        top = search.top_scores[probe_index].astype(np.float64)
        # Distractors at least as high as the mate push it down (pessimistic ties); beyond the kept
        # top-k the exact rank is irrelevant to a CMC that stops at k.
        ranks = 1 + (top >= genuine[:, None]).sum(axis=1)
        cmc = metrics.cmc_from_ranks(ranks, max_rank)
        num_impostor = probes.shape[0] * clean
        tar, thresholds = {}, {}
        for far in fars:
            allowed = int(np.floor(far * num_impostor + 1e-9))
            kept = search.impostor_top
            threshold = (np.nextafter(float(kept[allowed]), np.inf) if allowed < kept.size
                         else float(kept[-1]) if kept.size else -1.0)
            thresholds[f"{far:g}"] = float(threshold)
            tar[f"{far:g}"] = float((genuine[unordered] >= threshold).mean())
        results.append(MegaFaceResult(num_distractors=search.num_distractors, num_searches=int(ranks.size),
                                      rank1=float(cmc[0]), cmc=cmc.tolist(), tar_at_far=tar,
                                      thresholds=thresholds, genuine_scores=genuine[unordered],
                                      impostor_top=search.impostor_top))
    return results


def normalise_rows_inplace(features: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
    """L2-normalise a (possibly memory-mapped, possibly fp16) ``[N, D]`` array chunk by chunk."""
    for start in range(0, features.shape[0], chunk_size):
        block = np.asarray(features[start:start + chunk_size], dtype=np.float32)
        features[start:start + chunk_size] = metrics.l2_normalize(block).astype(features.dtype)
    return features


def write_devkit_features(root: str | os.PathLike[str], image_names: Sequence[str], features: np.ndarray,
                          suffix: str = "_arcface", noisy: np.ndarray | None = None,
                          identities: Sequence[str] | None = None, role: str = "distractor") -> None:
    """Write refined-protocol features for the official devkit: normalised, plus one extra dimension.

    ``role="probe"``: noisy probes become their identity centre (needs ``identities``), extra dim 0.
    ``role="distractor"``: clean features get 0 in the extra dimension, noisy ones :data:`NOISE_VALUE`.
    """
    if role not in ("probe", "distractor"):
        raise ValueError(f"role must be 'probe' or 'distractor', got {role!r}")
    noisy = np.zeros(features.shape[0], dtype=bool) if noisy is None else np.asarray(noisy, dtype=bool)
    if role == "probe":
        if identities is None:
            raise ValueError("role='probe' needs identities to compute identity centres")
        normalised = refine_probes(features, identities, noisy)
        extra = np.zeros(features.shape[0], dtype=np.float32)
    else:
        normalised = metrics.l2_normalize(features)
        extra = np.where(noisy, NOISE_VALUE, 0.0).astype(np.float32)
    write_feature_folder(root, image_names, np.concatenate([normalised, extra[:, None]], axis=1), suffix)


def overlapping_identities(train_centres: np.ndarray, facescrub_centres: np.ndarray,
                           threshold: float = 0.4, chunk_size: int = 4096) -> np.ndarray:
    """Indices of training identities whose centre has cosine > ``threshold`` with any FaceScrub centre
    (to remove from the training set before reporting MegaFace numbers)."""
    reference = metrics.l2_normalize(facescrub_centres)
    overlap = []
    for start in range(0, train_centres.shape[0], chunk_size):
        block = metrics.l2_normalize(train_centres[start:start + chunk_size])
        hits = (block @ reference.T).max(axis=1) > threshold
        overlap.append(np.nonzero(hits)[0] + start)
    return np.concatenate(overlap) if overlap else np.zeros(0, dtype=np.int64)


def iter_chunks(array: np.ndarray, chunk_size: int) -> Iterable[np.ndarray]:
    """Consecutive row blocks of ``array``."""
    for start in range(0, array.shape[0], chunk_size):
        yield array[start:start + chunk_size]
