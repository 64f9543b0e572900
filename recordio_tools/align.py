"""5-point face alignment to the ArcFace 112x112 template (numpy + OpenCV, no torch).

A face is aligned by the least-squares similarity transform (rotation, uniform scale, translation, no
reflection; Umeyama 1991) that maps its 5 detected landmarks (left eye, right eye, nose tip, left mouth
corner, right mouth corner, in image x/y pixels) onto :data:`ARCFACE_TEMPLATE_112`, followed by
``cv2.warpAffine`` with border value 0. ``pack_rec`` (alignment ``.lst`` files), the IJB evaluation and
deployment helpers all use this module so that training and evaluation faces are cut identically.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARCFACE_TEMPLATE_112", "align_face", "apply_similarity", "estimate_similarity",
           "template_for_size"]

#: ArcFace landmark template for 112x112 crops, (x, y) pixels: left eye, right eye, nose tip,
#: left mouth corner, right mouth corner (FORMATS.md section 3).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963],
                                 [73.5318, 51.5014],
                                 [56.0252, 71.7366],
                                 [41.5493, 92.3655],
                                 [70.7299, 92.2041]], dtype=np.float32)
ARCFACE_TEMPLATE_112.setflags(write=False)  # a shared constant: nobody may edit it in place

# Points spread over less than this (RMS distance to their centroid, in pixels) cannot define a scale
# or rotation; detectors that fail often return all-zero or all-equal landmarks.
_MIN_SPREAD = 1e-3


def _as_points(points: np.ndarray, name: str, count: int | None = None, min_count: int = 2) -> np.ndarray:
    """Validate an ``(N, 2)`` point array and return it as float64; ValueError says what is wrong."""
    array = np.asarray(points)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name}: expected numeric (x, y) points, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name}: expected an array of shape (N, 2) with (x, y) rows, got shape "
                         f"{tuple(array.shape)}")
    if count is not None and array.shape[0] != count:
        raise ValueError(f"{name}: expected {count} landmarks (left eye, right eye, nose, left and right "
                         f"mouth corner), got {array.shape[0]}")
    if array.shape[0] < min_count:
        raise ValueError(f"{name}: a similarity transform needs at least {min_count} points, "
                         f"got {array.shape[0]}")
    if not np.isfinite(array).all():
        row = int(np.nonzero(~np.isfinite(array).all(axis=1))[0][0])
        raise ValueError(f"{name}: point {row} is not finite: {array[row].tolist()}")
    return array


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``dst ~ s * R @ src + t`` (Umeyama), as a 2x3 float64 matrix.

    ``R`` is a proper rotation (no reflection), ``s > 0`` a uniform scale. ``src_pts`` and ``dst_pts``
    are ``(N, 2)`` arrays of corresponding (x, y) points, N >= 2. The result is the matrix
    ``cv2.warpAffine`` expects for mapping source image coordinates into the destination image.
    Raises ValueError for mismatched shapes, non-finite values, or points that coincide (no spread).
    """
    src = _as_points(src_pts, "src_pts")
    dst = _as_points(dst_pts, "dst_pts")
    if src.shape != dst.shape:
        raise ValueError(f"src_pts and dst_pts must have the same shape, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    src_var = float((src_centered ** 2).sum(axis=1).mean())
    dst_var = float((dst_centered ** 2).sum(axis=1).mean())
    for name, var in (("src_pts", src_var), ("dst_pts", dst_var)):
        if np.sqrt(var) < _MIN_SPREAD:
            raise ValueError(f"{name}: degenerate points (all at the same position, RMS spread "
                             f"{np.sqrt(var):.3g} px): cannot estimate rotation and scale")
    covariance = dst_centered.T @ src_centered / src.shape[0]
    u, singular, vt = np.linalg.svd(covariance)
    # Force det(R) = +1: when the best orthogonal fit is a reflection, flip the weakest axis instead.
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / src_var)
    if not scale > 0:
        # Only reachable when the best rotation-only fit explains nothing (e.g. points mirrored exactly).
        raise ValueError("degenerate correspondence: the best similarity transform has zero scale")
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def apply_similarity(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` points through a 2x3 affine ``matrix`` (as ``cv2.transform`` would), float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise ValueError(f"matrix: expected shape (2, 3), got {matrix.shape}")
    pts = _as_points(points, "points", min_count=0)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template scaled to a ``size`` x ``size`` crop (``size=112`` gives it unchanged)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size: expected a positive integer crop size, got {size!r}")
    return ARCFACE_TEMPLATE_112.astype(np.float64) * (float(size) / 112.0)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so its 5 ``landmarks`` land on the ArcFace template; returns ``size x size``.

    ``image`` is an ``HxW`` or ``HxWxC`` array (C = 1, 3 or 4; channel order is irrelevant to the warp,
    so BGR stays BGR and RGB stays RGB); ``landmarks`` is ``(5, 2)`` (x, y) in image pixels, ordered
    left eye, right eye, nose tip, left mouth corner, right mouth corner. Bilinear interpolation, border
    value 0 outside the source. The output has the input's dtype (uint8 for decoded images). For sizes
    other than 112 the template is scaled by ``size / 112``.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image: expected a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image: expected shape (H, W) or (H, W, 1|3|4), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image: empty image of shape {image.shape}")
    points = _as_points(landmarks, "landmarks", count=5)
    matrix = estimate_similarity(points, template_for_size(size))
    aligned = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if image.ndim == 3 and aligned.ndim == 2:  # OpenCV drops a trailing channel axis of 1
        aligned = aligned[:, :, None]
    return aligned
