"""IJB-B / IJB-C: release-layout reader, aligned flip-sum embedding with a resumable cache, template
pooling, 1:1 verification (TAR@FAR) and 1:N identification (CMC, TPIR@FPIR).

Layout (FORMATS.md section 5), ``<name>`` = ``ijbb`` or ``ijbc``::

    <root>/meta/<name>_face_tid_mid.txt         image_name template_id media_id
    <root>/meta/<name>_template_pair_label.txt  template1 template2 label
    <root>/meta/<name>_name_5pts_score.txt      image_name x1 y1 ... x5 y5 detector_score
    <root>/loose_crop/<image_name>
    <root>/meta/<name>_1N_gallery_G1.csv, <name>_1N_gallery_G2.csv, <name>_1N_probe_mixed.csv
                                                (1:N, optional; header with TEMPLATE_ID, SUBJECT_ID)

Template pooling: image features (flip-summed) are L2-normalised unless the feature norm is used as
a quality signal, optionally weighted by the detector score, averaged within a media, summed over
medias and L2-normalised; a pair's score is the cosine of its two templates. Pooling and scores are
float64 (see :func:`pool_templates`). The defaults (norm as quality on, detector score on, flip on)
are the setting most published IJB numbers use.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval import metrics
from eval.embedder import Embedder

__all__ = ["IJBRelease", "load_ijb", "embed_ijb", "pool_templates", "score_pairs", "IJBResult",
           "evaluate_ijb", "load_1n_protocol", "identify"]

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class IJBRelease:
    root: Path
    name: str                      # "ijbb" or "ijbc"
    image_names: list[str]
    templates: np.ndarray          # [N] template id per image
    medias: np.ndarray             # [N] media id per image
    landmarks: np.ndarray          # [N, 5, 2]
    detector_scores: np.ndarray    # [N]
    pairs: np.ndarray              # [P, 2] template ids
    labels: np.ndarray             # [P] bool

    @property
    def num_images(self) -> int:
        return len(self.image_names)


def _detect_name(meta: Path) -> str:
    found = [n for n in ("ijbc", "ijbb") if (meta / f"{n}_face_tid_mid.txt").is_file()]
    if not found:
        raise FileNotFoundError(f"{meta}: no ijbc_face_tid_mid.txt or ijbb_face_tid_mid.txt (is this an IJB "
                                "release root with a meta/ folder?)")
    return found[0]


def _read_rows(path: Path, arity: int, what: str) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != arity:
                raise ValueError(f"{path} line {number}: expected {arity} fields ({what}), got {len(fields)}")
            rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: empty ({what})")
    return rows


def _ints(rows: list[list[str]], column: int, path: Path) -> np.ndarray:
    try:
        return np.array([int(r[column]) for r in rows], dtype=np.int64)
    except ValueError:
        bad = next(i for i, r in enumerate(rows) if not r[column].lstrip("-").isdigit())
        raise ValueError(f"{path} row {bad + 1}: column {column + 1} is {rows[bad][column]!r}, expected an "
                         "integer") from None


def load_ijb(root: str | os.PathLike[str], name: str | None = None) -> IJBRelease:
    """Read and cross-check the meta files of an IJB-B/C release (errors name file and line)."""
    root = Path(root)
    meta = root / "meta"
    name = (name or _detect_name(meta)).lower()
    tid_path = meta / f"{name}_face_tid_mid.txt"
    face_rows = _read_rows(tid_path, 3, "image_name template_id media_id")
    image_names = [r[0] for r in face_rows]
    templates, medias = _ints(face_rows, 1, tid_path), _ints(face_rows, 2, tid_path)

    lmk_path = meta / f"{name}_name_5pts_score.txt"
    landmark_rows = _read_rows(lmk_path, 12, "image_name, 10 landmark values, detector score")
    by_name: dict[str, tuple[int, list[str]]] = {}
    for number, row in enumerate(landmark_rows, start=1):
        by_name[row[0]] = (number, row[1:])
    landmarks = np.zeros((len(image_names), 5, 2), dtype=np.float32)
    scores = np.zeros(len(image_names), dtype=np.float32)
    for index, image in enumerate(image_names):
        if image not in by_name:
            raise ValueError(f"{lmk_path}: no landmarks for image {image!r} (listed in {tid_path} line "
                             f"{index + 1})")
        number, values = by_name[image]
        try:
            numbers = np.array([float(v) for v in values], dtype=np.float32)
        except ValueError:
            raise ValueError(f"{lmk_path} line {number}: non-numeric landmark/score value") from None
        landmarks[index] = numbers[:10].reshape(5, 2)
        scores[index] = numbers[10]

    pair_path = meta / f"{name}_template_pair_label.txt"
    pair_rows = _read_rows(pair_path, 3, "template1 template2 label")
    pairs = np.stack([_ints(pair_rows, 0, pair_path), _ints(pair_rows, 1, pair_path)], axis=1)
    labels = _ints(pair_rows, 2, pair_path)
    if not np.isin(labels, [0, 1]).all():
        bad = int(np.nonzero(~np.isin(labels, [0, 1]))[0][0])
        raise ValueError(f"{pair_path} line {bad + 1}: label {labels[bad]} is not 0 or 1")
    known = np.unique(templates)
    missing = ~np.isin(pairs, known)
    if missing.any():
        row = int(np.nonzero(missing.any(axis=1))[0][0])
        raise ValueError(f"{pair_path} line {row + 1}: template {int(pairs[row][missing[row]][0])} has no "
                         f"images in {tid_path}")
    return IJBRelease(root, name, image_names, templates, medias, landmarks, scores, pairs,
                      labels.astype(bool))


def _align_face(image, landmarks):
    from recordio_tools.align import align_face

    return align_face(image, landmarks, size=112)


def _load_aligned(release: IJBRelease, index: int) -> np.ndarray:
    from arcface import preprocess

    path = release.root / "loose_crop" / release.image_names[index]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    rgb = preprocess.decode_rgb(data, source=str(path))
    # Alignment is a geometric warp, blind to channel order, so it runs on the RGB decode directly.
    return np.ascontiguousarray(_align_face(rgb, release.landmarks[index]))


def _cache_manifest(release: IJBRelease, chunk_size: int, model_id: str) -> dict[str, Any]:
    digest = hashlib.sha1("\n".join(release.image_names).encode()).hexdigest()
    return {"dataset": release.name, "num_images": release.num_images, "chunk_size": chunk_size,
            "images_sha1": digest, "model": model_id, "flip_sum": True}


def embed_ijb(embedder: Embedder, release: IJBRelease, cache_dir: str | os.PathLike[str] | None = None,
              chunk_size: int = 4096, batch_size: int = 64, model_id: str = "", rank: int = 0,
              world_size: int = 1, progress: bool = True) -> np.ndarray:
    """Flip-summed features ``[N, D]`` of every image, cached per image chunk so a crash resumes.

    Chunk ``i`` covers images ``[i*chunk_size, (i+1)*chunk_size)`` and is written as
    ``chunk_{i:06d}.npy`` (temporary name, then rename) in ``cache_dir``; a manifest ties the cache to
    the image list and ``model_id`` so a stale cache is refused rather than silently reused. With
    several ranks sharing ``cache_dir``, rank ``r`` computes chunks ``r, r+W, ...``; every rank then
    waits at a barrier and reads the complete cache.
    """
    from recordio_tools.progress import progress_bar

    num_chunks = (release.num_images + chunk_size - 1) // chunk_size
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        manifest = _cache_manifest(release, chunk_size, model_id)
        manifest_path = cache / "manifest.json"
        if manifest_path.is_file():
            existing = json.loads(manifest_path.read_text())
            if existing != manifest:
                raise ValueError(f"{manifest_path}: feature cache was made for {existing}, not {manifest}; "
                                 "use another cache directory or delete this one")
        elif rank == 0:
            tmp = manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(manifest_path)
    chunks: dict[int, np.ndarray] = {}
    mine = [i for i in range(num_chunks) if i % world_size == rank]
    todo = [i for i in mine if cache is None or not (cache / f"chunk_{i:06d}.npy").is_file()]
    images_todo = sum(min(chunk_size, release.num_images - i * chunk_size) for i in todo)
    bar = progress_bar(total=images_todo, desc=f"embed {release.name}", unit="img",
                       disable=not progress or rank != 0)
    for chunk in todo:
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, release.num_images)
        parts = []
        for batch_start in range(start, stop, batch_size):
            indices = range(batch_start, min(batch_start + batch_size, stop))
            parts.append(embedder.embed_images(np.stack([_load_aligned(release, i) for i in indices])))
            bar.update(len(indices))
        features = np.concatenate(parts).astype(np.float32)
        if cache is not None:
            final = cache / f"chunk_{chunk:06d}.npy"
            tmp = cache / f".chunk_{chunk:06d}.tmp-{os.getpid()}.npy"
            np.save(tmp, features)
            os.replace(tmp, final)
        chunks[chunk] = features
    bar.close()
    if world_size > 1:
        from arcface.distributed import barrier

        barrier()
    out = []
    for chunk in range(num_chunks):
        if chunk not in chunks:
            if cache is None:
                raise RuntimeError("world_size > 1 needs a shared cache_dir to exchange IJB features")
            chunks[chunk] = np.load(cache / f"chunk_{chunk:06d}.npy", allow_pickle=False)
        out.append(chunks[chunk])
    return np.concatenate(out)


def pool_templates(image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                   detector_scores: np.ndarray | None = None, norm_as_quality: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Template features: mean within (template, media), sum over medias, L2. Returns ``(ids, feats)``.

    The per-image steps (L2 normalisation when the norm is not used as quality, detector-score
    weighting) run in the embeddings' own precision (float32 for every embedder; float16 is promoted
    to float32 so squared norms cannot overflow), as InsightFace's IJB script does. The media means, the
    sum over medias and the final L2 normalisation run in float64 and the templates are returned in
    float64: a float32 template or score would round nearby cosines onto one value and so create score
    ties that do not exist, which merges ROC points and moves TAR@FAR.
    """
    features = np.asarray(image_features)
    if features.ndim != 2:
        raise ValueError(f"image features must be [N, D], got shape {features.shape}")
    templates = np.asarray(templates).ravel()
    medias = np.asarray(medias).ravel()
    if templates.shape != (features.shape[0],) or medias.shape != (features.shape[0],):
        raise ValueError(f"{features.shape[0]} image features but {templates.size} template ids and "
                         f"{medias.size} media ids")
    dtype = np.result_type(features.dtype, np.float32)  # float16 -> float32, float32/64 kept, ints -> 64
    features = features.astype(dtype, copy=False)
    if not norm_as_quality:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), dtype.type(1e-12))
    if detector_scores is not None:
        detector_scores = np.asarray(detector_scores).ravel()
        if detector_scores.shape != (features.shape[0],):
            raise ValueError(f"{features.shape[0]} image features but {detector_scores.size} detector scores")
        features = features * detector_scores.astype(dtype)[:, None]
    features = features.astype(np.float64)
    template_ids, template_of = np.unique(templates, return_inverse=True)
    media_keys, media_of = np.unique(np.stack([template_of, medias], axis=1), axis=0, return_inverse=True)
    media_of = media_of.ravel()
    media_sum = np.zeros((media_keys.shape[0], features.shape[1]))
    np.add.at(media_sum, media_of, features)
    media_mean = media_sum / np.bincount(media_of, minlength=media_keys.shape[0])[:, None]
    template_sum = np.zeros((template_ids.size, features.shape[1]))
    np.add.at(template_sum, media_keys[:, 0], media_mean)
    norms = np.linalg.norm(template_sum, axis=1, keepdims=True)
    return template_ids, template_sum / np.maximum(norms, 1e-12)


def score_pairs(template_ids: np.ndarray, template_features: np.ndarray, pairs: np.ndarray,
                chunk_size: int = 1 << 20) -> np.ndarray:
    """Cosine score (float64) of each template pair, computed a chunk of pairs at a time."""
    template_features = np.asarray(template_features, dtype=np.float64)
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] template ids, got shape {pairs.shape}")
    rows = np.searchsorted(template_ids, pairs)
    rows = np.minimum(rows, template_ids.size - 1)
    if not np.array_equal(template_ids[rows], pairs):
        bad = int(np.nonzero((template_ids[rows] != pairs).any(axis=1))[0][0])
        raise ValueError(f"pair {bad}: template(s) {pairs[bad].tolist()} have no features")
    scores = np.empty(pairs.shape[0], dtype=np.float64)
    for start in range(0, pairs.shape[0], chunk_size):
        a = template_features[rows[start:start + chunk_size, 0]]
        b = template_features[rows[start:start + chunk_size, 1]]
        scores[start:start + chunk_size] = np.einsum("ij,ij->i", a, b)
    return scores


def load_1n_protocol(root: str | os.PathLike[str], name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"G1": (template_ids, subject_ids), "G2": ..., "probe": ...}`` from the 1:N CSVs present."""
    meta = Path(root) / "meta"
    files = {"G1": f"{name}_1N_gallery_G1.csv", "G2": f"{name}_1N_gallery_G2.csv",
             "probe": f"{name}_1N_probe_mixed.csv"}
    out = {}
    for key, filename in files.items():
        path = meta / filename
        if not path.is_file():
            continue
        subject_of: dict[int, int] = {}
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"TEMPLATE_ID", "SUBJECT_ID"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: header must contain TEMPLATE_ID and SUBJECT_ID, "
                                 f"got {reader.fieldnames}")
            for number, row in enumerate(reader, start=2):
                try:
                    template, subject = int(row["TEMPLATE_ID"]), int(row["SUBJECT_ID"])
                except (TypeError, ValueError):
                    raise ValueError(f"{path} line {number}: TEMPLATE_ID/SUBJECT_ID must be "
                                     "integers") from None
                if subject_of.setdefault(template, subject) != subject:
                    raise ValueError(f"{path} line {number}: template {template} listed with two subjects")
        ids = np.array(sorted(subject_of), dtype=np.int64)
        out[key] = (ids, np.array([subject_of[t] for t in ids], dtype=np.int64))
    if out and ("probe" not in out or not ({"G1", "G2"} & set(out))):
        raise ValueError(f"{meta}: incomplete 1:N protocol, found only {sorted(out)}")
    return out


def identify(template_ids: np.ndarray, template_features: np.ndarray, probe: tuple[np.ndarray, np.ndarray],
             gallery: tuple[np.ndarray, np.ndarray], ranks: tuple[int, ...] = (1, 5, 10),
             fpirs: tuple[float, ...] = (1e-2, 1e-1), chunk_size: int = 4096) -> dict[str, Any]:
    """Open-set 1:N search of probe templates against a gallery: CMC on mated probes, TPIR@FPIR."""
    def rows_of(ids: np.ndarray, what: str) -> np.ndarray:
        rows = np.minimum(np.searchsorted(template_ids, ids), template_ids.size - 1)
        if not np.array_equal(template_ids[rows], ids):
            missing = ids[template_ids[rows] != ids]
            raise ValueError(f"1:N {what}: {missing.size} templates have no images in the 1:1 meta "
                             f"(first {missing[:5].tolist()})")
        return rows

    template_features = np.asarray(template_features, dtype=np.float64)  # float64 scores, like 1:1
    gallery_feats = template_features[rows_of(gallery[0], "gallery")]
    probe_rows = rows_of(probe[0], "probe")
    rank_parts, mate_parts, top_parts = [], [], []
    for start in range(0, probe_rows.size, chunk_size):
        similarity = template_features[probe_rows[start:start + chunk_size]] @ gallery_feats.T
        r, m, t = metrics.ranks_from_similarity(similarity, probe[1][start:start + chunk_size], gallery[1])
        rank_parts.append(r)
        mate_parts.append(m)
        top_parts.append(t)
    probe_ranks, mate_scores, top_scores = (np.concatenate(p) for p in (rank_parts, mate_parts, top_parts))
    mated = probe_ranks > 0
    if not mated.any():
        raise ValueError("1:N: no probe subject appears in the gallery")
    cmc = metrics.cmc_from_ranks(probe_ranks[mated], max(ranks))
    out: dict[str, Any] = {"num_probes": int(probe_ranks.size), "num_mated": int(mated.sum()),
                           "num_gallery": int(gallery[0].size), "cmc": cmc.tolist()}
    out.update({f"rank{r}": float(cmc[r - 1]) for r in ranks})
    if (~mated).any():
        tpir = metrics.tpir_at_fpir(probe_ranks, mate_scores, top_scores, fpirs)
        out.update({f"tpir@fpir={f:g}": float(v) for f, v in zip(fpirs, tpir)})
    return out


@dataclass
class IJBResult:
    name: str
    num_images: int
    num_templates: int
    num_pairs: int
    tar_nearest: dict[str, float]
    tar_interpolated: dict[str, float]
    identification: dict[str, dict[str, Any]]
    seconds: float = 0.0
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool), repr=False)
    roc_fpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    roc_tpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "num_images", "num_templates", "num_pairs",
                                              "tar_nearest", "tar_interpolated", "identification", "seconds")}


def evaluate_ijb(embedder: Embedder, root: str | os.PathLike[str], name: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, batch_size: int = 64,
                 use_detector_score: bool = True, norm_as_quality: bool = True, model_id: str = "",
                 chunk_size: int = 4096, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> IJBResult:
    """The whole IJB-B/C evaluation: 1:1 TAR at FAR 1e-6..1e-1 (both readings) and 1:N if present."""
    started = time.perf_counter()
    release = load_ijb(root, name)
    features = embed_ijb(embedder, release, cache_dir=cache_dir, chunk_size=chunk_size,
                         batch_size=batch_size, model_id=model_id, rank=rank, world_size=world_size,
                         progress=progress)
    template_ids, template_feats = pool_templates(
        features, release.templates, release.medias,
        release.detector_scores if use_detector_score else None, norm_as_quality)
    scores = score_pairs(template_ids, template_feats, release.pairs)
    fpr, tpr, _ = metrics.roc_curve(scores, release.labels)
    nearest = metrics.tar_at_far(fpr, tpr, IJB_FARS, "nearest")
    interpolated = metrics.tar_at_far(fpr, tpr, IJB_FARS, "interpolated")
    identification = {}
    protocol = load_1n_protocol(release.root, release.name)
    for gallery in ("G1", "G2"):
        if gallery in protocol:
            identification[gallery] = identify(template_ids, template_feats, protocol["probe"],
                                               protocol[gallery])
    return IJBResult(
        name=release.name.upper(), num_images=release.num_images, num_templates=int(template_ids.size),
        num_pairs=int(scores.size), tar_nearest={f"{f:g}": float(v) for f, v in zip(IJB_FARS, nearest)},
        tar_interpolated={f"{f:g}": float(v) for f, v in zip(IJB_FARS, interpolated)},
        identification=identification, seconds=time.perf_counter() - started, scores=scores,
        labels=release.labels, roc_fpr=fpr, roc_tpr=tpr)
