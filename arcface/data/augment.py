"""Training augmentations on decoded RGB images (numpy/cv2), driven by a per-image generator."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np


class Augmenter:
    """Random image augmentations on ``HxWx3`` ``uint8`` RGB arrays (numpy/cv2, run in the workers).

    Order: random resized crop, low resolution, blur, colour jitter, grayscale, horizontal flip. Each is
    off by default; :meth:`from_config` reads a ``DataConfig``-like object (``flip``,
    ``random_resized_crop``, ``crop_scale_min``, ``color_jitter``, ``grayscale_prob``, ``blur_prob``,
    ``low_res_prob``, ``low_res_min_size``; missing attributes mean "off").
    """

    def __init__(self, flip: bool = False, random_resized_crop: bool = False, crop_scale_min: float = 0.8,
                 color_jitter: float = 0.0, grayscale_prob: float = 0.0, blur_prob: float = 0.0,
                 low_res_prob: float = 0.0, low_res_min_size: int = 16) -> None:
        self.flip = bool(flip)
        self.random_resized_crop = bool(random_resized_crop)
        self.crop_scale_min = float(crop_scale_min)
        self.color_jitter = float(color_jitter)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.low_res_prob = float(low_res_prob)
        self.low_res_min_size = int(low_res_min_size)

    @classmethod
    def from_config(cls, augment: Any) -> Augmenter:
        names = ("flip", "random_resized_crop", "crop_scale_min", "color_jitter", "grayscale_prob",
                 "blur_prob", "low_res_prob", "low_res_min_size")
        defaults = cls()
        return cls(**{name: getattr(augment, name, getattr(defaults, name)) for name in names})

    @property
    def active(self) -> bool:
        return (self.flip or self.random_resized_crop or self.color_jitter > 0 or self.grayscale_prob > 0
                or self.blur_prob > 0 or self.low_res_prob > 0)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = rgb.shape[0]
        if self.random_resized_crop:
            rgb = self._resized_crop(rgb, rng)
        if self.low_res_prob > 0 and rng.random() < self.low_res_prob:
            # Downscale with area averaging (what a low-resolution camera would record), then back up
            # with bilinear interpolation (what the deployment pipeline does to small faces).
            low = int(rng.integers(self.low_res_min_size, max(self.low_res_min_size, size // 2) + 1))
            small = cv2.resize(rgb, (low, low), interpolation=cv2.INTER_AREA)
            rgb = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
        if self.blur_prob > 0 and rng.random() < self.blur_prob:
            rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=float(rng.uniform(0.5, 2.0)))
        if self.color_jitter > 0:
            rgb = self._jitter(rgb, rng)
        if self.grayscale_prob > 0 and rng.random() < self.grayscale_prob:
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            rgb = np.repeat(gray[:, :, None], 3, axis=2)
        if self.flip and rng.random() < 0.5:
            rgb = rgb[:, ::-1]
        return np.ascontiguousarray(rgb)

    def _resized_crop(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = rgb.shape[:2]
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(self.crop_scale_min, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_w = int(round(math.sqrt(target * aspect)))
            crop_h = int(round(math.sqrt(target / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                crop = rgb[top:top + crop_h, left:left + crop_w]
                return cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
        return rgb  # no valid crop drawn (only for extreme aspect settings): keep the image whole

    def _jitter(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.color_jitter
        brightness, contrast, saturation = rng.uniform(1 - s, 1 + s, size=3)
        image = rgb.astype(np.float32) * brightness
        gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = (image - gray.mean()) * contrast + gray.mean()
        gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = (image - gray[..., None]) * saturation + gray[..., None]
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
