"""The single definition of how a face image becomes a network input.

Every consumer uses this module: the training dataset, evaluation (all three embedders), ONNX export
parity and the deployment helpers. Its constants travel in checkpoint and ONNX metadata
(:func:`metadata`), so a deployment can reproduce the exact input contract:

* decoded images are **RGB**, ``uint8``, ``INPUT_SIZE`` x ``INPUT_SIZE`` (112 x 112, already aligned);
* network input is NCHW ``float32`` ``(pixel - MEAN) / STD`` with ``MEAN = STD = 127.5``;
* evaluation embeds an image and its horizontal flip and sums the two embeddings ("flip-sum").

Numpy functions serve onnxruntime and data workers; the torch functions normalise on the target
device so that only ``uint8`` crosses the host-to-device copy (4x fewer bytes than float32).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

INPUT_SIZE = 112
MEAN = 127.5
STD = 127.5
COLOR_ORDER = "RGB"


class ImageDecodeError(ValueError):
    """An encoded image could not be decoded (the message names where it came from)."""


def decode_rgb(data: bytes | bytearray | memoryview | np.ndarray, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG/PNG) to an ``HxWx3`` ``uint8`` RGB array.

    ``source`` names the file/record in the error message when decoding fails.
    """
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buffer.size == 0:
        raise ImageDecodeError(f"{source}: empty image data")
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"{source}: image data does not decode ({buffer.size} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def ensure_size(rgb: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize to ``size`` x ``size`` if needed (inputs are expected to be aligned crops already)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


def normalize_numpy(rgb_hwc: np.ndarray) -> np.ndarray:
    """``uint8`` RGB ``HxWx3`` or ``NxHxWx3`` -> ``float32`` ``(N)x3xHxW`` normalised input."""
    array = np.asarray(rgb_hwc, dtype=np.float32)
    array = (array - MEAN) / STD
    if array.ndim == 3:
        return np.ascontiguousarray(array.transpose(2, 0, 1))
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def to_chw_uint8(rgb_hwc: np.ndarray) -> torch.Tensor:
    """``uint8`` RGB ``HxWx3`` -> ``uint8`` tensor ``3xHxW`` (what data workers hand to the loop)."""
    return torch.from_numpy(np.ascontiguousarray(rgb_hwc.transpose(2, 0, 1)))


def normalize(images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` NCHW RGB tensor (on any device) -> normalised floating tensor on the same device."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    return images_uint8.to(dtype).sub_(MEAN).div_(STD)


def flip_horizontal(images: torch.Tensor) -> torch.Tensor:
    """Mirror an NCHW batch left-right (the flip of flip-sum evaluation and of training augmentation)."""
    return torch.flip(images, dims=[3])


def flip_horizontal_numpy(images_nchw: np.ndarray) -> np.ndarray:
    """Numpy twin of :func:`flip_horizontal` for NCHW arrays."""
    return np.ascontiguousarray(images_nchw[..., ::-1])


def metadata() -> dict[str, object]:
    """The input contract, stored in checkpoints and ONNX metadata."""
    return {
        "input_size": [INPUT_SIZE, INPUT_SIZE],
        "color_order": COLOR_ORDER,
        "layout": "NCHW",
        "mean": MEAN,
        "std": STD,
        "normalisation": "(pixel - 127.5) / 127.5",
        "flip_sum_evaluation": True,
    }
