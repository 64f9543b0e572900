"""Synthetic face identities: a deterministic, seeded generator of face-like 112x112 BGR images.

No real face data can be downloaded in this project's environments, so tests, the demo and benchmarks
train and evaluate on drawn faces. Each identity has fixed traits derived only from ``(seed, identity)``
(face outline, skin and hair tones, hair style, eyebrow/eye/nose/mouth shapes and positions, ear size,
moles and birthmarks, glasses, beard), so any identity renders alone and identically on any machine
with the same OpenCV. Each image of an identity varies by nuisances derived from
``(seed, identity, image_index)``: background, pose (rotation, scale, shift, shear, yaw and pitch of the
features), expression (smile, open mouth, blink, raised brows), lighting gradient, brightness, colour
cast, blur, noise, occasional occlusion, and JPEG quality.

Faces sit roughly where the ArcFace 112x112 template puts them (eyes near (38, 52) and (74, 52), nose
(56, 72), mouth corners (42, 92) and (71, 92)); :func:`render_identity_sample` also returns the exact
5 landmarks of every image, which makes alignment testable.

The folder layout ``out/id_000123/id_000123_0001.jpg`` is what ``pack_rec pack`` reads, and its file
names follow LFW's ``name/name_NNNN.jpg`` convention so that both pairs-file styles resolve.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .align import ARCFACE_TEMPLATE_112
from .cli_style import EXIT_STATUS_HELP, Parser

__all__ = ["GENERATOR_VERSION", "IMAGE_SIZE", "IdentityTraits", "SynthSummary", "add_cli", "generate_folder",
           "identity_name", "identity_traits", "image_name", "main", "render_identity_image",
           "render_identity_jpeg", "render_identity_sample", "write_pairs"]

#: Bumped whenever the same (seed, identity, image_index) would render different pixels.
GENERATOR_VERSION = 1
IMAGE_SIZE = 112
#: Hidden completion record at the root of a generated folder (hidden so that ``pack`` ignores it).
MARKER_NAME = ".synth.json"

# Independent random streams per purpose, so adding a nuisance never changes identity traits.
_STREAM_TRAITS, _STREAM_NUISANCE, _STREAM_JPEG, _STREAM_PAIRS = 0, 1, 2, 3

_AA = cv2.LINE_AA
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
_CENTERED_X = (_XX - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)
_CENTERED_Y = (_YY - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)

# BGR palettes the traits interpolate within (light to dark skin; common hair and iris colours).
_SKIN = np.array([[205, 222, 250], [165, 192, 232], [122, 155, 205], [82, 112, 160], [52, 72, 112]],
                 np.float32)
_HAIR = np.array([[22, 22, 28], [30, 45, 72], [45, 75, 118], [105, 165, 210], [45, 75, 165], [165, 168, 172],
                  [215, 218, 222]], np.float32)
_HAIR_P = np.array([0.28, 0.22, 0.18, 0.12, 0.07, 0.08, 0.05])
_IRIS = np.array([[30, 55, 95], [165, 115, 60], [85, 135, 90], [130, 130, 118], [22, 30, 42]], np.float32)

# Canonical landmark positions (before per-identity offsets and per-image pose).
_T = ARCFACE_TEMPLATE_112.astype(np.float64)
_EYE_CX = (_T[0, 0] + _T[1, 0]) / 2
_EYE_Y = (_T[0, 1] + _T[1, 1]) / 2
_EYE_HALF = (_T[1, 0] - _T[0, 0]) / 2
_NOSE = _T[2]
_MOUTH_CX = (_T[3, 0] + _T[4, 0]) / 2
_MOUTH_Y = (_T[3, 1] + _T[4, 1]) / 2
_MOUTH_HALF = (_T[4, 0] - _T[3, 0]) / 2

_CONTOUR_ANGLES = np.linspace(0, 2 * np.pi, 48, endpoint=False)


@dataclass(frozen=True)
class IdentityTraits:
    """Fixed appearance of one identity in the canonical (pre-pose) 112x112 frame; BGR colours."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: int  # 0 bald, 1 short, 2 long, 3 fringe, 4 side part, 5 curly volume
    hairline: float  # y of the hairline at the face centre
    hair_volume: float
    face_center: tuple[float, float]
    face_axes: tuple[float, float]
    jaw: float  # narrowing of the lower face (0 round .. 0.35 pointed)
    cheek: float  # widening at cheek height
    eye_y: float
    eye_half: float  # half the distance between the eye centres
    eye_size: tuple[float, float]
    eye_tilt: float
    iris: tuple[float, float, float]
    iris_radius: float
    brow_gap: float
    brow_thickness: int
    brow_arch: float
    brow_tilt: float
    brow_length: float
    nose: tuple[float, float]
    nose_width: float
    nose_style: int
    mouth_y: float
    mouth_half: float
    lip_upper: float
    lip_lower: float
    lip: tuple[float, float, float]
    ear_size: tuple[float, float]
    marks: tuple[tuple[float, float, float, float], ...]  # (x, y, radius, darkness) in face-relative units
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_colour: tuple[float, float, float]
    beard: int  # 0 none, 1 stubble, 2 full beard, 3 moustache


def _check_index(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def _rng(seed: int, identity: int, stream: int, image_index: int = 0) -> np.random.Generator:
    return np.random.default_rng([_check_index(seed, "seed"), _check_index(identity, "identity"), stream,
                                  _check_index(image_index, "image_index")])


def _colour(rgb: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(c) for c in np.clip(rgb, 0, 255))


@functools.lru_cache(maxsize=8192)
def identity_traits(identity: int, seed: int = 0) -> IdentityTraits:
    """The fixed traits of ``identity`` under ``seed`` (pure function of the two; cached)."""
    rng = _rng(seed, identity, _STREAM_TRAITS)
    u = rng.uniform
    tone = u(0, len(_SKIN) - 1)
    low = int(min(tone, len(_SKIN) - 2))
    skin = _SKIN[low] * (1 - (tone - low)) + _SKIN[low + 1] * (tone - low) + rng.normal(0, 7, 3)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * u(0.8, 1.15) + rng.normal(0, 6, 3)
    face_axes = (u(35.0, 44.0), u(47.0, 56.0))
    face_center = (56.0 + u(-1.5, 1.5), 66.0 + u(-3.0, 3.0))
    eye_y = _EYE_Y + u(-3.5, 3.5)
    hair_style = int(rng.choice(6, p=[0.08, 0.3, 0.22, 0.15, 0.15, 0.1]))
    marks = []
    for _ in range(int(rng.integers(0, 4))):
        # Face-relative position (units of the face axes), kept off the eyes and the mouth.
        marks.append((u(-0.75, 0.75), u(-0.25, 0.7), u(0.8, 2.2), u(0.25, 0.6)))
    if rng.random() < 0.2:  # a larger, faint birthmark
        marks.append((u(-0.7, 0.7), u(-0.1, 0.6), u(3.0, 6.0), u(0.12, 0.25)))
    iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 8, 3)
    lip = skin * np.array([0.72, 0.68, 0.98]) + rng.normal(0, 6, 3)
    beard = int(rng.choice(4, p=[0.7, 0.1, 0.12, 0.08]))
    glasses = int(rng.choice(3, p=[0.78, 0.11, 0.11]))
    glasses_colour = rng.choice([20.0, 60.0, 120.0, 180.0]) * np.ones(3) + rng.normal(0, 20, 3)
    return IdentityTraits(
        skin=_colour(skin), hair=_colour(hair), hair_style=hair_style,
        hairline=face_center[1] - face_axes[1] * u(0.5, 0.8), hair_volume=u(2.0, 9.0),
        face_center=face_center, face_axes=face_axes, jaw=u(0.0, 0.35), cheek=u(-0.05, 0.1),
        eye_y=eye_y, eye_half=_EYE_HALF + u(-3.5, 3.5), eye_size=(u(5.0, 8.0), u(2.4, 4.2)),
        eye_tilt=u(-0.12, 0.12), iris=_colour(iris), iris_radius=u(2.2, 3.4),
        brow_gap=u(5.0, 10.0), brow_thickness=int(rng.integers(1, 5)), brow_arch=u(-1.0, 4.0),
        brow_tilt=u(-3.0, 3.0), brow_length=u(0.9, 1.4),
        nose=(_NOSE[0] + u(-1.0, 1.0), _NOSE[1] + u(-3.5, 3.5)), nose_width=u(3.5, 7.5),
        nose_style=int(rng.integers(3)), mouth_y=_MOUTH_Y + u(-3.5, 3.5),
        mouth_half=_MOUTH_HALF + u(-3.5, 3.5),
        lip_upper=u(1.5, 4.5), lip_lower=u(2.0, 6.0), lip=_colour(lip),
        ear_size=(u(4.0, 7.5), u(8.0, 13.0)), marks=tuple(marks), glasses=glasses,
        glasses_colour=_colour(glasses_colour), beard=beard)


def _mix(a: Sequence[float], b: Sequence[float], weight: float) -> tuple[float, float, float]:
    return tuple(float(x) * (1 - weight) + float(y) * weight for x, y in zip(a, b))


def _scale(colour: Sequence[float], factor: float) -> tuple[float, float, float]:
    return tuple(min(255.0, float(c) * factor) for c in colour)


def _poly(points: np.ndarray) -> list[np.ndarray]:
    # cv2 sub-pixel drawing: 4 fractional bits keep thin features from snapping to whole pixels.
    return [np.round(np.asarray(points) * 16).astype(np.int32).reshape(-1, 1, 2)]


def _pt(point: np.ndarray) -> tuple[int, int]:
    """A point in cv2's 4-fractional-bit fixed point (pass ``shift=4`` to the drawing call)."""
    return (int(round(float(point[0]) * 16)), int(round(float(point[1]) * 16)))


def _fill(canvas: np.ndarray, mask: np.ndarray | None, points: np.ndarray, colour) -> None:
    cv2.fillPoly(canvas, _poly(points), colour, _AA, 4)
    if mask is not None:
        cv2.fillPoly(mask, _poly(points), 255, _AA, 4)


def _ellipse_points(center: Sequence[float], axes: Sequence[float], start: float = 0.0, end: float = 360.0,
                    angle: float = 0.0, count: int = 24) -> np.ndarray:
    t = np.radians(np.linspace(start, end, count))
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack([center[0] + ca * x - sa * y, center[1] + sa * x + ca * y], axis=1)


def _face_contour(traits: IdentityTraits, shift_x: float) -> np.ndarray:
    cx, cy = traits.face_center
    a, b = traits.face_axes
    s, c = np.sin(_CONTOUR_ANGLES), np.cos(_CONTOUR_ANGLES)
    lower = np.clip(s, 0, None)
    # Narrow the jaw below the centre, widen at the cheeks: a cheap way to vary the outline shape.
    width = 1.0 - traits.jaw * lower ** 2 + traits.cheek * np.exp(-((s - 0.25) / 0.3) ** 2)
    return np.stack([cx + shift_x + a * c * width, cy + b * s], axis=1)


def _render_layer(traits: IdentityTraits,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the face (canonical frame) on a black layer; returns (layer, coverage mask, 5 landmarks)."""
    u = rng.uniform
    layer = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    skin, hair = traits.skin, traits.hair
    # Per-image expression and head turn; yaw/pitch move the inner features against the outline.
    yaw, pitch = u(-1.0, 1.0), u(-1.0, 1.0)
    smile = u(-0.3, 1.0)
    mouth_open = u(0.2, 1.0) if rng.random() < 0.25 else 0.0
    blink = rng.random() < 0.08
    eye_open = 0.12 if blink else u(0.75, 1.1)
    brow_raise = u(-1.0, 2.5)
    cx, cy = traits.face_center
    a, b = traits.face_axes

    # Behind the head: long hair, then neck and ears.
    if traits.hair_style in (2, 5):
        grow = 10 if traits.hair_style == 2 else 14
        back = _ellipse_points((cx, cy - 6), (a + traits.hair_volume + 4, b + grow), count=32)
        if traits.hair_style == 2:
            back = np.concatenate([back[back[:, 1] < cy], [[cx + a + 8, 116], [cx - a - 8, 116]]])
        _fill(layer, mask, back, hair)
    neck_half = a * 0.5
    _fill(layer, mask, np.array([[cx - neck_half, cy + b * 0.4], [cx + neck_half, cy + b * 0.4],
                                 [cx + neck_half + 4, 116], [cx - neck_half - 4, 116]]), _scale(skin, 0.78))
    ear_w, ear_h = traits.ear_size
    for side in (-1, 1):
        # The ear on the side the head turns away from shrinks (it rotates out of view).
        visible = float(np.clip(1.0 + 0.6 * side * yaw, 0.3, 1.4))
        center = (cx + side * (a - 1) - 0.8 * yaw, traits.eye_y + 9)
        _fill(layer, mask, _ellipse_points(center, (ear_w * visible, ear_h), count=16), _scale(skin, 0.9))

    contour = _face_contour(traits, -0.8 * yaw)
    _fill(layer, mask, contour, skin)

    # Hair above the hairline: an upper half-ellipse closed by a style-specific hairline curve.
    if traits.hair_style != 0:
        top = cy - b
        vol = traits.hair_volume
        hl = traits.hairline
        cap_axes = (a + vol * 0.6 + 1, max(hl - top + vol, 4.0))
        cap = _ellipse_points((cx - 0.8 * yaw, hl), cap_axes, 180, 360, count=24)
        xs = np.linspace(cap[-1, 0], cap[0, 0], 15)
        rel = (xs - cx) / a
        if traits.hair_style == 3:  # fringe: hair comes down over the forehead, jagged edge
            edge = hl + 7 + 2.0 * np.cos(rel * 14) - 3 * rel ** 2
        elif traits.hair_style == 4:  # side part: slanted hairline
            edge = hl + 5 * rel + 2 - 2 * rel ** 2
        else:  # receding/rounded hairline, lower at the temples
            edge = hl - 3 * (1 - rel ** 2) + 8 * rel ** 4
        cap = np.concatenate([cap, np.stack([xs, edge], axis=1)])
        _fill(layer, mask, cap, hair)
        if traits.hair_style == 5:  # curly volume: bumps around the cap
            for angle in np.linspace(190, 350, 7):
                bump = _pt(_ellipse_points((cx, hl), cap_axes, angle, angle, count=1)[0])
                cv2.circle(layer, bump, int(vol * 16 + 40), hair, -1, _AA, 4)
                cv2.circle(mask, bump, int(vol * 16 + 40), 255, -1, _AA, 4)

    # Marks (moles, birthmarks) are part of the identity's texture.
    for mx, my, radius, dark in traits.marks:
        center = np.array([cx + mx * a * 0.8 - 0.5 * yaw, cy + my * b * 0.75])
        cv2.circle(layer, _pt(center), int(radius * 16),
                   _mix(skin, (30, 40, 70), dark), -1, _AA, 4)

    # Beard before the mouth so the lips stay visible.
    feature_shift = 3.0 * yaw
    mouth_c = np.array([_MOUTH_CX + 4.0 * yaw, traits.mouth_y + 1.8 * pitch])
    if traits.beard in (1, 2):
        # The contour runs clockwise from the right cheek (angle 0) under the chin to the left cheek, so
        # its points below the cut are one contiguous run; close it over the upper lip, left to right.
        cut = traits.nose[1] + (6 if traits.beard == 2 else 10)
        lower = contour[(contour[:, 1] > cut) & (np.arange(len(contour)) < len(contour) // 2)]
        strength = 0.35 if traits.beard == 1 else 0.85
        beard = np.concatenate([lower, [[mouth_c[0] - traits.mouth_half - 2, mouth_c[1] - 5],
                                        [mouth_c[0] + traits.mouth_half + 2, mouth_c[1] - 5]]])
        _fill(layer, None, beard, _mix(skin, hair, strength))
    if traits.beard in (2, 3):
        mx, my, mh = mouth_c[0], mouth_c[1], traits.mouth_half
        moustache = np.array([[mx - mh - 1, my - 1], [mx, my - 6.5], [mx + mh + 1, my - 1], [mx, my - 3.5]])
        _fill(layer, None, moustache, _mix(skin, hair, 0.9))

    # Eyes and brows.
    eye_w, eye_h = traits.eye_size
    eye_y = traits.eye_y + 1.2 * pitch
    eyes = []
    for side in (-1, 1):
        center = np.array([_EYE_CX + side * traits.eye_half + feature_shift, eye_y])
        eyes.append(center)
        width = eye_w * float(np.clip(1.0 + 0.15 * side * yaw, 0.7, 1.3))
        tilt = math.degrees(side * traits.eye_tilt)
        brow_y = center[1] - traits.brow_gap - brow_raise
        length = width * traits.brow_length
        brow = np.array([[center[0] - side * length * 0.8, brow_y + side * 0 + traits.brow_tilt * 0.5],
                         [center[0] + side * length * 0.1, brow_y - traits.brow_arch],
                         [center[0] + side * length, brow_y - traits.brow_tilt * 0.5 + 1]])
        cv2.polylines(layer, _poly(brow), False, _mix(hair, (20, 20, 20), 0.3), traits.brow_thickness, _AA, 4)
        if blink:
            lid = _ellipse_points(center, (width, eye_h * 0.5), 0, 180, tilt, count=9)
            cv2.polylines(layer, _poly(lid), False, (30, 30, 30), 1, _AA, 4)
            continue
        height = eye_h * eye_open
        _fill(layer, None, _ellipse_points(center, (width, height), angle=tilt, count=20), (232, 236, 238))
        look = np.array([u(-1.5, 1.5) + 1.2 * yaw, u(-0.5, 0.5)])
        iris_r = min(traits.iris_radius, height + 0.3)
        iris_c = center + look
        cv2.circle(layer, _pt(iris_c), int(iris_r * 16), traits.iris, -1, _AA, 4)
        cv2.circle(layer, _pt(iris_c), int(iris_r * 7), (15, 15, 15), -1, _AA, 4)
        upper = _ellipse_points(center, (width, height), 180, 360, tilt, count=12)
        cv2.polylines(layer, _poly(upper), False, (35, 35, 40), 1, _AA, 4)

    # Nose: bridge shading, nostrils, tip.
    nose = np.array([traits.nose[0] + 6.0 * yaw, traits.nose[1] + 2.5 * pitch])
    shade = _scale(skin, 0.78)
    nw = traits.nose_width
    if traits.nose_style == 0:
        bridge = np.array([[nose[0] - 1.5 - 2 * yaw, eye_y + 3], [nose[0] - nw * 0.6, nose[1] - 1],
                           [nose[0] - nw * 0.3, nose[1] + 1.5]])
        cv2.polylines(layer, _poly(bridge), False, shade, 1, _AA, 4)
    elif traits.nose_style == 1:
        _fill(layer, None, np.array([[nose[0] - 2 * yaw, eye_y + 2], [nose[0] + nw * 0.6, nose[1]],
                                     [nose[0] - nw * 0.6, nose[1]]]), _scale(skin, 0.92))
    else:
        cv2.polylines(layer, _poly(np.array([[nose[0] + nw * 0.8, nose[1] - 1], [nose[0], nose[1] + 2],
                                             [nose[0] - nw * 0.8, nose[1] - 1]])), False, shade, 1, _AA, 4)
    for side in (-1, 1):
        nostril = nose + np.array([side * nw * 0.45, 1.0])
        _fill(layer, None, _ellipse_points(nostril, (1.6, 1.0), count=10), _scale(skin, 0.5))

    # Mouth: upper and lower lip polygons around a mouth line bent by the smile.
    half = traits.mouth_half * (1.0 + 0.08 * smile)
    xs = np.linspace(-1, 1, 11)
    bump = 1 - xs ** 2
    line_x = mouth_c[0] + half * xs
    line_y = mouth_c[1] - 3.0 * smile * (1 - bump) + 0.8
    gap = 7.0 * mouth_open * bump
    upper = line_y - traits.lip_upper * bump * (1 - 0.35 * np.exp(-(xs / 0.18) ** 2))
    lower_top = line_y + gap
    lower = lower_top + traits.lip_lower * bump

    def band(top_y: np.ndarray, bottom_y: np.ndarray) -> np.ndarray:
        return np.concatenate([np.stack([line_x, top_y], 1), np.stack([line_x, bottom_y], 1)[::-1]])

    if mouth_open > 0:
        _fill(layer, None, band(line_y, lower_top), (25, 20, 45))
        _fill(layer, None, band(line_y, line_y + np.minimum(gap, 2.5)), (215, 225, 230))  # teeth
    _fill(layer, None, band(upper, line_y), traits.lip)
    _fill(layer, None, band(lower_top, lower), _scale(traits.lip, 1.06))
    cv2.polylines(layer, _poly(np.stack([line_x, line_y], 1)), False, _scale(traits.lip, 0.55), 1, _AA, 4)

    if traits.glasses:
        colour = traits.glasses_colour
        for center in eyes:
            if traits.glasses == 1:
                cv2.circle(layer, _pt(center), int((eye_w + 3.5) * 16), colour, 1, _AA, 4)
            else:
                box = np.array([[center[0] - eye_w - 4, center[1] - eye_h - 4], [center[0] + eye_w + 4,
                                center[1] - eye_h - 4], [center[0] + eye_w + 4, center[1] + eye_h + 5],
                                [center[0] - eye_w - 4, center[1] + eye_h + 5]])
                cv2.polylines(layer, _poly(box), True, colour, 1, _AA, 4)
        bridge = np.array([[eyes[0][0] + eye_w + 3, eyes[0][1] - 1],
                           [eyes[1][0] - eye_w - 3, eyes[1][1] - 1]])
        cv2.polylines(layer, _poly(bridge), False, colour, 1, _AA, 4)

    landmarks = np.array([eyes[0], eyes[1], nose,
                          [line_x[0], line_y[0]], [line_x[-1], line_y[-1]]], dtype=np.float64)
    return layer, mask, landmarks


def _background(rng: np.random.Generator) -> np.ndarray:
    u = rng.uniform
    base = rng.uniform(20, 235, 3).astype(np.float32)
    angle = u(0, 2 * np.pi)
    ramp = (_CENTERED_X * math.cos(angle) + _CENTERED_Y * math.sin(angle))[..., None]
    image = base + ramp * rng.uniform(-60, 60, 3).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):  # clutter: a few shapes, often behind the head
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        p1 = rng.uniform(-10, 122, 2)
        p2 = p1 + rng.uniform(-50, 50, 2)
        if rng.random() < 0.5:
            cv2.rectangle(image, tuple(np.round(p1).astype(int)), tuple(np.round(p2).astype(int)), colour, -1)
        else:
            cv2.circle(image, tuple(np.round(p1).astype(int)), int(u(4, 30)), colour, -1, _AA)
    return image


def _occlude(image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> None:
    """Draw one occluder in place: a bar over the eyes (sunglasses), a patch, or a skin-like 'hand'."""
    u = rng.uniform
    kind = rng.integers(3)
    colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
    if kind == 0:
        left, right = landmarks[0], landmarks[1]
        direction = (right - left) / max(np.linalg.norm(right - left), 1e-6)
        normal = np.array([-direction[1], direction[0]])
        half_w, half_h = u(0.8, 1.2) * np.linalg.norm(right - left) / 2 + 10, u(4, 8)
        mid = (left + right) / 2
        along, across = direction * half_w, normal * half_h
        corners = np.array([mid - along - across, mid + along - across, mid + along + across,
                            mid - along + across])
        cv2.fillPoly(image, _poly(corners), tuple(c * 0.25 for c in colour), _AA, 4)
    elif kind == 1:
        corner = rng.uniform(0, 90, 2)
        size = rng.uniform(18, 45, 2)
        cv2.rectangle(image, tuple(np.round(corner).astype(int)), tuple(np.round(corner + size).astype(int)),
                      colour, -1)
    else:
        center = landmarks[3 + int(rng.integers(2))] + rng.uniform(-8, 8, 2)
        axes = (u(12, 22), u(8, 14))
        tone = _SKIN[int(rng.integers(len(_SKIN)))]
        hand = _ellipse_points(center, axes, angle=u(0, 180), count=20)
        cv2.fillPoly(image, _poly(hand), _colour(tone), _AA, 4)


def render_identity_sample(identity: int, image_index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``image_index`` of ``identity``: ``(BGR uint8 [112, 112, 3], landmarks float64 [5, 2])``.

    The landmarks are the exact (x, y) positions of left eye, right eye, nose tip and mouth corners in
    the returned image (before blur/noise, which do not move them). Pure function of its arguments.
    """
    traits = identity_traits(_check_index(identity, "identity"), _check_index(seed, "seed"))
    rng = _rng(seed, identity, _STREAM_NUISANCE, image_index)
    u = rng.uniform
    layer, mask, landmarks = _render_layer(traits, rng)

    # Pose: similarity + a little shear around the face centre, as a head moves in front of a camera.
    theta = math.radians(u(-12, 12))
    scale = u(0.9, 1.1)
    shear = u(-0.08, 0.08)
    shift = rng.uniform(-4.5, 4.5, 2)
    linear = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    linear = linear @ np.array([[1.0, shear], [0.0, 1.0]])
    center = np.array([56.0, 64.0])
    matrix = np.concatenate([linear, (center + shift - linear @ center)[:, None]], axis=1)
    layer = cv2.warpAffine(layer, matrix, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(mask, matrix, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_LINEAR)
    landmarks = landmarks @ linear.T + matrix[:, 2]

    alpha = mask.astype(np.float32)[..., None] * (1.0 / 255.0)
    image = _background(rng).astype(np.float32) * (1.0 - alpha) + layer.astype(np.float32) * alpha
    if rng.random() < 0.15:
        canvas = np.clip(image, 0, 255).astype(np.uint8)
        _occlude(canvas, landmarks, rng)
        image = canvas.astype(np.float32)

    # Lighting: a directional gradient, global brightness/contrast and a colour cast.
    angle = u(0, 2 * np.pi)
    gradient = 1.0 + u(0.0, 0.45) * (_CENTERED_X * math.cos(angle) + _CENTERED_Y * math.sin(angle))
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    contrast = u(0.75, 1.2)
    image = (image - 128.0) * contrast + 128.0
    image = image * (gradient[..., None] * cast * u(0.7, 1.25))

    if rng.random() < 0.5:
        sigma = u(0.4, 1.4)
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    noise_sigma = u(0.0, 7.0)
    if noise_sigma > 0.5:
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * noise_sigma
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), landmarks


def render_identity_image(identity: int, image_index: int, seed: int = 0) -> np.ndarray:
    """Image ``image_index`` of ``identity`` as a BGR uint8 ``[112, 112, 3]`` array (deterministic)."""
    return render_identity_sample(identity, image_index, seed)[0]


def jpeg_quality(identity: int, image_index: int, seed: int = 0) -> int:
    """JPEG quality (40..95) the generator encodes this image with (a per-image nuisance)."""
    return int(_rng(seed, identity, _STREAM_JPEG, image_index).integers(40, 96))


def render_identity_jpeg(identity: int, image_index: int, seed: int = 0) -> bytes:
    """The JPEG file content :func:`generate_folder` writes for this image."""
    image = render_identity_image(identity, image_index, seed)
    quality = jpeg_quality(identity, image_index, seed)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV built without JPEG support
        raise RuntimeError("OpenCV could not encode a JPEG (is it built with libjpeg?)")
    return encoded.tobytes()


# ---------------------------------------------------------------------------------------------- folders
def identity_name(identity: int) -> str:
    """Folder name of an identity: ``id_000123`` (at least 6 digits)."""
    return f"id_{_check_index(identity, 'identity'):06d}"


def image_name(identity: int, image_index: int) -> str:
    """File name of an image, LFW style and 1-based: ``id_000123_0001.jpg`` for ``image_index`` 0."""
    return f"{identity_name(identity)}_{_check_index(image_index, 'image_index') + 1:04d}.jpg"


@dataclass
class SynthSummary:
    """What :func:`generate_folder` wrote."""

    out_dir: str
    first_identity: int
    identities: int
    images_per_identity: int
    seed: int
    num_images: int
    seconds: float
    generator_version: int = GENERATOR_VERSION

    @property
    def images_per_minute(self) -> float:
        """Generation rate over the whole run."""
        return 60.0 * self.num_images / max(self.seconds, 1e-9)


def _write_identity(job: tuple[str, int, int, int]) -> int:
    """Render and write all images of one identity into ``folder``; returns the number written."""
    folder, identity, images_per_identity, seed = job
    target = Path(folder) / identity_name(identity)
    target.mkdir(exist_ok=True)
    for index in range(images_per_identity):
        (target / image_name(identity, index)).write_bytes(render_identity_jpeg(identity, index, seed))
    return images_per_identity


def _validate_counts(identities: int, images_per_identity: int, first_identity: int, workers: int) -> None:
    for key, value, minimum in (("identities", identities, 1),
                                ("images_per_identity", images_per_identity, 1),
                                ("first_identity", first_identity, 0), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{key}: expected an integer >= {minimum}, got {value!r}")


def generate_folder(out_dir: str | os.PathLike, identities: int, images_per_identity: int, seed: int = 0,
                    first_identity: int = 0, workers: int = 1, progress: bool = True) -> SynthSummary:
    """Write identities ``first_identity .. first_identity+identities-1`` as ``out_dir/<id>/<image>.jpg``.

    The folder is built under a temporary sibling name and renamed into place when complete, with a
    hidden ``.synth.json`` record of the parameters; an interrupted run leaves only the temporary
    folder. ``out_dir`` must not exist or be an empty folder (nothing the user has is overwritten).
    ``workers > 1`` renders identities in that many processes. Output is identical for any ``workers``.
    """
    _validate_counts(identities, images_per_identity, first_identity, workers)
    _check_index(seed, "seed")
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a folder; choose another -o/--output")
        if any(out.iterdir()):
            raise FileExistsError(f"{out}: folder exists and is not empty; choose another -o/--output or "
                                  "remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    jobs = [(str(tmp), identity, images_per_identity, seed)
            for identity in range(first_identity, first_identity + identities)]
    total = identities * images_per_identity
    start = time.perf_counter()
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(total=total, unit="img", desc=f"synth {out.name}")
    try:
        if workers == 1:
            results: Iterable[int] = map(_write_identity, jobs)
            pool = None
        else:
            import multiprocessing

            pool = multiprocessing.get_context("spawn" if sys.platform == "win32" else "fork").Pool(workers)
            chunksize = max(1, min(16, len(jobs) // (workers * 8)))
            results = pool.imap_unordered(_write_identity, jobs, chunksize=chunksize)
        try:
            written = 0
            for count in results:
                written += count
                if bar is not None:
                    bar.update(count)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        seconds = time.perf_counter() - start
        summary = SynthSummary(str(out), first_identity, identities, images_per_identity, seed, written,
                               seconds)
        record = asdict(summary)
        # The record describes content only: timing and location would make identical folders differ.
        record.pop("seconds")
        record.pop("out_dir")
        (tmp / MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return summary


def read_marker(root: str | os.PathLike) -> dict:
    """The ``.synth.json`` record of a generated folder; ValueError if it is missing or unreadable."""
    path = Path(root) / MARKER_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a complete synthetic folder ({error})") from None


# ------------------------------------------------------------------------------------------------ pairs
def _identity_images(root: Path, identity: int) -> list[str]:
    folder = root / identity_name(identity)
    try:
        names = sorted(name for name in os.listdir(folder)
                       if name.endswith(".jpg") and not name.startswith("."))
    except OSError as error:
        raise ValueError(f"{folder}: cannot list identity folder ({error.strerror or error})") from None
    return names


def write_pairs(out_path: str | os.PathLike, root: str | os.PathLike, identities: Iterable[int], pairs: int,
                seed: int = 0, fmt: str = "list") -> Path:
    """Write a pairs file over ``identities`` (folders under ``root``): half same, half different.

    ``fmt="list"``: one ``relative/path1 relative/path2 1|0`` line per pair, paths relative to the pairs
    file's own folder (where ``pack_rec bin`` resolves them unless given ``--root``, as ``pack_rec pack``
    does for ``.lst`` files), same and different pairs alternating so that every consecutive block (fold)
    is balanced.
    ``fmt="lfw"``: LFW ``pairs.txt`` (header ``10 N``, then per fold N ``name i j`` same lines and N
    ``name1 i name2 j`` different lines, 1-based image numbers); ``pairs`` must be a multiple of 20.
    Pairs are distinct while possible, drawn deterministically from ``seed``. Written atomically.
    """
    if fmt not in ("list", "lfw"):
        raise ValueError(f"fmt: expected 'list' or 'lfw', got {fmt!r}")
    if isinstance(pairs, bool) or not isinstance(pairs, (int, np.integer)) or pairs < 2:
        raise ValueError(f"pairs: expected an integer >= 2, got {pairs!r}")
    if fmt == "lfw" and pairs % 20:
        raise ValueError(f"pairs: LFW style needs a multiple of 20 (10 folds of same + different), "
                         f"got {pairs}")
    root = Path(root)
    ids = [_check_index(identity, "identities") for identity in identities]
    if len(ids) < 2:
        raise ValueError(f"identities: need at least 2 identities for different pairs, got {len(ids)}")
    images = {identity: _identity_images(root, identity) for identity in ids}
    for identity, names in images.items():
        if not names:
            raise ValueError(f"{root / identity_name(identity)}: no .jpg images for identity {identity}")
    multi = [identity for identity in ids if len(images[identity]) >= 2]
    if not multi:
        raise ValueError(f"{root}: every identity has a single image; same pairs need at least 2")
    rng = np.random.default_rng([_check_index(seed, "seed"), _STREAM_PAIRS, len(ids), pairs])
    seen: set[tuple] = set()

    def draw(same: bool) -> tuple[int, str, int, str]:
        for _attempt in range(50):  # retry duplicates; tiny sets simply repeat pairs
            if same:
                identity = multi[int(rng.integers(len(multi)))]
                first, second = sorted(rng.choice(len(images[identity]), 2, replace=False).tolist())
                pair = (identity, images[identity][first], identity, images[identity][second])
            else:
                one, two = rng.choice(len(ids), 2, replace=False).tolist()
                pair = (ids[one], images[ids[one]][int(rng.integers(len(images[ids[one]])))],
                        ids[two], images[ids[two]][int(rng.integers(len(images[ids[two]])))])
            key = pair if same else tuple(sorted([pair[:2], pair[2:]]))
            if key not in seen:
                break
        seen.add(key)
        return pair

    out = Path(out_path)
    lines: list[str] = []
    if fmt == "list":
        # The image folder as seen from the pairs file's folder ("" when they are the same folder).
        base = Path(os.path.relpath(os.path.abspath(root), os.path.abspath(out.parent))).as_posix()
        base = "" if base == "." else base + "/"
        if any(character.isspace() for character in base):
            raise ValueError(f"{root}: the path from the pairs file's folder to the images contains a space, "
                             f"which a pairs file cannot hold; put the pairs file elsewhere")
        for number in range(pairs):
            same = number % 2 == 0
            a, name_a, b, name_b = draw(same)
            lines.append(f"{base}{identity_name(a)}/{name_a} {base}{identity_name(b)}/{name_b} {int(same)}")
    else:
        per_fold = pairs // 20
        lines.append(f"10 {per_fold}")

        def number_of(name: str) -> int:
            return int(Path(name).stem.rsplit("_", 1)[1])

        for _fold in range(10):
            for _ in range(per_fold):
                a, name_a, _b, name_b = draw(True)
                lines.append(f"{identity_name(a)}\t{number_of(name_a)}\t{number_of(name_b)}")
            for _ in range(per_fold):
                a, name_a, b, name_b = draw(False)
                lines.append(f"{identity_name(a)}\t{number_of(name_a)}\t{identity_name(b)}\t{number_of(name_b)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out


# -------------------------------------------------------------------------------------------------- CLI
def _cmd_synth(args: argparse.Namespace) -> int:
    try:
        # Check the pairs options before spending minutes on images that would then lack their pairs.
        if args.pairs < 0 or args.pairs == 1:
            raise ValueError(f"--pairs: expected 0 (none) or at least 2, got {args.pairs}")
        if args.pairs and args.pairs_format == "lfw" and args.pairs % 20:
            raise ValueError(f"--pairs: LFW style needs a multiple of 20 (10 folds of same + different), "
                             f"got {args.pairs}")
        if args.pairs and args.identities < 2:
            raise ValueError("--pairs: needs --identities >= 2")
        if args.pairs and args.images_per_identity < 2:
            raise ValueError("--pairs: needs --images-per-identity >= 2 for same-identity pairs")
        pairs_file = Path(args.pairs_file) if args.pairs_file else None
        if args.pairs and pairs_file is None:
            out = Path(args.out)
            pairs_file = out.parent / f"{out.name}_pairs.txt"
        if pairs_file is not None and not args.pairs:
            raise ValueError("--pairs-file given without --pairs (the number of pairs to write)")
        summary = generate_folder(args.out, args.identities, args.images_per_identity, seed=args.seed,
                                  first_identity=args.first_identity, workers=args.workers,
                                  progress=not args.quiet)
        last = summary.first_identity + summary.identities - 1
        print(f"wrote {summary.num_images} images of {summary.identities} identities "
              f"(ids {summary.first_identity}..{last}) to {summary.out_dir} "
              f"in {summary.seconds:.1f} s ({summary.images_per_minute:,.0f} images/min)")
        if args.pairs:
            identities = range(args.first_identity, args.first_identity + args.identities)
            path = write_pairs(pairs_file, args.out, identities, args.pairs, seed=args.seed,
                               fmt=args.pairs_format)
            # List-style paths are relative to the pairs file's folder, where `bin` looks by default;
            # LFW names carry no folder, so `bin` needs the image folder as --root.
            where = "paths relative to its own folder" if args.pairs_format == "list" else "LFW names"
            root = "" if args.pairs_format == "list" else f" --root {shlex.quote(str(args.out))}"
            target = shlex.quote(str(path.with_name(path.stem.removesuffix("_pairs") + ".bin")))
            print(f"wrote {args.pairs} pairs ({args.pairs_format} format, {where}) to {path}; "
                  f"verification pack: pack_rec bin {shlex.quote(str(path))} -o {target}{root}")
    except (ValueError, OSError) as error:
        print(f"pack_rec synth: {error}", file=sys.stderr)
        return 2
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``synth`` subcommand on subparsers made with ``parser_class=cli_style.Parser``
    (``func(args) -> exit code``)."""
    p = subparsers.add_parser("synth", help="generate synthetic face identities as an image folder",
                              description="Generate face-like 112x112 JPEGs as "
                                          "OUT/id_NNNNNN/id_NNNNNN_NNNN.jpg.", epilog=EXIT_STATUS_HELP)
    p.add_output("output folder (must not exist or be empty)", dest="out", metavar="OUT",
                 old_options=["--out"])
    p.add_argument("--identities", type=int, required=True, help="number of identities")
    p.add_argument("--images-per-identity", type=int, required=True, help="images per identity")
    p.add_argument("--seed", type=int, default=0, help="generator seed (traits and nuisances)")
    p.add_argument("--first-identity", type=int, default=0,
                   help="first identity index; use a disjoint range for held-out evaluation identities")
    p.add_argument("--pairs", type=int, default=0, help="also write this many verification pairs (0: none)")
    p.add_argument("--pairs-file", default=None, help="pairs file path (default: OUT_pairs.txt next to OUT)")
    p.add_argument("--pairs-format", choices=["list", "lfw"], default="list",
                   help="'path1 path2 1|0' lines with paths relative to the pairs file's folder (`pack_rec "
                        "bin PAIRS OUT.bin` reads them as they are), or LFW pairs.txt (10 folds; --pairs a "
                        "multiple of 20; `pack_rec bin` then needs --root OUT)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_quiet("no progress bar")
    p.set_defaults(func=_cmd_synth)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recordio_tools.synth -o DIR ...`` (same options as ``pack_rec synth``)."""
    parser = Parser(prog="synth")
    add_cli(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["synth", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
