"""5-point alignment: template values, Umeyama vs an independent linear least-squares fit, exact recovery
of known similarities, image round trips through a known warp, border value, and input errors."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recordio_tools.align import (
    ARCFACE_TEMPLATE_112,
    align_face,
    apply_similarity,
    estimate_similarity,
    template_for_size,
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    theta = math.radians(angle_deg)
    c, s = scale * math.cos(theta), scale * math.sin(theta)
    return np.array([[c, -s, tx], [s, c, ty]])


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: a similarity is linear in (a, b, tx, ty) with x' = a x - b y + tx, y' = b x + a y + ty,
    so the least-squares similarity is an ordinary linear least-squares problem (no SVD involved)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, -y, 1, 0])
        rhs.append(u)
        rows.append([y, x, 0, 1])
        rhs.append(v)
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows, float), np.array(rhs, float), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_is_the_published_arcface_template():
    expected = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                [70.7299, 92.2041]]
    assert ARCFACE_TEMPLATE_112.dtype == np.float32 and ARCFACE_TEMPLATE_112.shape == (5, 2)
    np.testing.assert_array_equal(ARCFACE_TEMPLATE_112, np.array(expected, np.float32))
    with pytest.raises(ValueError):
        ARCFACE_TEMPLATE_112[0, 0] = 0  # read-only: nobody can corrupt the shared constant
    np.testing.assert_allclose(template_for_size(224), ARCFACE_TEMPLATE_112.astype(np.float64) * 2)


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(0.05, 20), angle=st.floats(-180, 180), tx=st.floats(-500, 500),
       ty=st.floats(-500, 500))
def test_known_similarity_of_the_template_is_recovered_exactly(scale, angle, tx, ty):
    matrix = similarity(scale, angle, tx, ty)
    template = ARCFACE_TEMPLATE_112.astype(np.float64)
    moved = template @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(estimate_similarity(template, moved), matrix, rtol=1e-9,
                               atol=1e-7 * (1 + scale))
    # ... and the inverse direction (what align_face does: detected points -> template).
    inverse = estimate_similarity(moved, template)
    np.testing.assert_allclose(apply_similarity(inverse, moved), template, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), count=st.integers(2, 12))
def test_noisy_points_match_the_linear_least_squares_reference(seed, count):
    rng = np.random.default_rng(seed)
    src = rng.uniform(-100, 100, (count, 2))
    linear = similarity(rng.uniform(0.2, 3), rng.uniform(-180, 180), 0, 0)[:, :2]
    dst = src @ linear.T + rng.normal(0, 5, (count, 2))
    if np.sqrt(((src - src.mean(0)) ** 2).sum(1).mean()) < 1e-2:
        return
    reference = lstsq_similarity(src, dst)
    if np.hypot(reference[0, 0], reference[1, 0]) < 1e-6:
        return  # a zero-scale fit has no defined rotation
    np.testing.assert_allclose(estimate_similarity(src, dst), reference, rtol=1e-7, atol=1e-7)


def test_no_reflection_for_mirrored_points():
    template = ARCFACE_TEMPLATE_112.astype(np.float64)
    mirrored = template * np.array([-1.0, 1.0]) + np.array([112.0, 0.0])
    matrix = estimate_similarity(template, mirrored)
    linear = matrix[:, :2]
    assert np.linalg.det(linear) > 0  # a rotation times a positive scale, never a flip
    np.testing.assert_allclose(linear[0, 0], linear[1, 1], atol=1e-12)
    np.testing.assert_allclose(linear[0, 1], -linear[1, 0], atol=1e-12)
    # It is still the least-squares optimum among proper similarities (the linear reference has no flip).
    np.testing.assert_allclose(matrix, lstsq_similarity(template, mirrored), atol=1e-9)


def _smooth_face() -> np.ndarray:
    from recordio_tools.synth import render_identity_image

    return cv2.GaussianBlur(render_identity_image(3, 1, seed=5), (0, 0), 1.2)


def test_landmarks_on_the_template_give_the_image_back_unchanged():
    image = _smooth_face()
    aligned = align_face(image, ARCFACE_TEMPLATE_112)
    np.testing.assert_array_equal(aligned, image)


@pytest.mark.parametrize("scale,angle", [(1.6, 25.0), (2.0, -40.0), (1.3, 170.0)])
def test_face_warped_by_a_known_transform_is_aligned_back(scale, angle):
    image = _smooth_face()
    matrix = similarity(scale, angle, 0, 0)
    # Place the warped face fully inside a larger canvas.
    corners = np.array([[0, 0], [111, 0], [0, 111], [111, 111]], float) @ matrix[:, :2].T
    matrix[:, 2] = 20 - corners.min(axis=0)
    canvas_size = int(np.ceil((corners.max(axis=0) - corners.min(axis=0)).max())) + 40
    warped = cv2.warpAffine(image, matrix, (canvas_size, canvas_size), flags=cv2.INTER_CUBIC)
    landmarks = apply_similarity(matrix, ARCFACE_TEMPLATE_112)
    aligned = align_face(warped, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    inner = (slice(4, 108), slice(4, 108))
    difference = np.abs(aligned[inner].astype(int) - image[inner].astype(int))
    assert difference.mean() < 2.0, difference.mean()
    assert np.percentile(difference, 99) < 14


def test_border_value_is_zero_and_channels_are_kept():
    image = np.full((200, 200, 3), 200, np.uint8)
    # A tiny face at the top-left corner: most of the crop lies outside the source image.
    landmarks = ARCFACE_TEMPLATE_112 * 0.3 - 10
    aligned = align_face(image, landmarks)
    assert aligned[0, 0].tolist() == [0, 0, 0] and aligned[-1, -1].tolist() == [200, 200, 200]
    assert align_face(image[:, :, 0], landmarks).shape == (112, 112)
    assert align_face(image[:, :, :1], landmarks).shape == (112, 112, 1)
    assert align_face(image, landmarks * 2, size=224).shape == (224, 224, 3)


@pytest.mark.parametrize("landmarks,message", [
    (np.zeros((4, 2)), "expected 5 landmarks"),
    (np.zeros((5, 3)), "shape (N, 2)"),
    (np.full((5, 2), 30.0), "degenerate"),
    (np.array([[1, 2], [3, np.nan], [5, 6], [7, 8], [9, 1]], float), "point 1 is not finite"),
    (np.array([["a", "b"]] * 5), "numeric"),
])
def test_bad_landmarks_raise_clear_errors(landmarks, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        align_face(np.zeros((112, 112, 3), np.uint8), landmarks)


def test_bad_images_and_mismatched_points_raise():
    with pytest.raises(ValueError, match="image"):
        align_face(np.zeros((112, 112, 2), np.uint8), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="empty"):
        align_face(np.zeros((0, 5, 3), np.uint8), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="same shape"):
        estimate_similarity(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="size"):
        template_for_size(0)
