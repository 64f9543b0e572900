"""One embedding path for evaluation: a live model, a checkpoint (or arcface_torch weights), or an ONNX file.

Every embedder takes aligned ``uint8`` RGB images ``[N, 112, 112, 3]`` and returns ``float32 [N, D]``
embeddings. With ``flip=True`` (the default, the standard protocol) each embedding is the *sum* of the
embeddings of the image and of its horizontal mirror, not normalised: callers normalise (and may use
the norm as a quality signal). Decoding, colour order, normalisation and flipping all come from
:mod:`arcface.preprocess`, so the three embedders see bit-identical inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from arcface import preprocess

__all__ = ["Embedder", "ModelEmbedder", "CheckpointEmbedder", "OnnxEmbedder", "build_embedder",
           "embed_encoded", "iter_batches", "model_identity", "describe_model"]


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps aligned RGB ``uint8`` NHWC images to ``float32 [N, D]`` embeddings."""

    embedding_size: int

    def embed_images(self, rgb_uint8_nhwc: np.ndarray) -> np.ndarray:
        """Embed a batch (flip-summed when the embedder was built with ``flip=True``)."""
        ...


def _check_images(rgb_uint8_nhwc: np.ndarray) -> np.ndarray:
    images = np.asarray(rgb_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[1:3] != (preprocess.INPUT_SIZE, preprocess.INPUT_SIZE):
        raise ValueError(f"expected aligned {preprocess.INPUT_SIZE}x{preprocess.INPUT_SIZE} images, got "
                         f"{images.shape[1]}x{images.shape[2]}")
    return images


def _unwrap(model: nn.Module) -> nn.Module:
    # A DistributedDataParallel forward syncs buffers with the other ranks: evaluating through it on
    # one rank would block forever, so evaluation always runs the bare module.
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper: same weights, no recompiles


def _probe_embedding_size(embedder: Embedder) -> int:
    """Embedding size found by embedding one blank image (when the model does not declare it)."""
    blank = np.zeros((1, preprocess.INPUT_SIZE, preprocess.INPUT_SIZE, 3), dtype=np.uint8)
    return int(embedder.embed_images(blank).shape[1])


class ModelEmbedder:
    """Embed with a live ``nn.Module`` (the training loop's backbone).

    ``dtype`` selects autocast (``torch.float16``/``torch.bfloat16``) on the model's device; ``None``
    runs in the model's own precision. The model is put in eval mode for the call and its previous
    train/eval mode restored afterwards.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 64,
                 flip: bool = True, dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be None, float32, float16 or bfloat16, got {dtype}")
        self.model = _unwrap(model)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.flip = flip
        self.dtype = dtype
        # Channels-last inputs (the model converted by the caller, or by CheckpointEmbedder which owns
        # its model): ~1.5x faster convolutions on CPU (oneDNN) and with tensor cores on CUDA.
        self.channels_last = channels_last
        self._embedding_size: int | None = getattr(self.model, "embedding_size", None)

    @property
    def embedding_size(self) -> int:
        if self._embedding_size is None:
            self._embedding_size = _probe_embedding_size(self)
        return self._embedding_size

    def _forward(self, images_uint8_nchw: torch.Tensor) -> torch.Tensor:
        inputs = preprocess.normalize(images_uint8_nchw.to(self.device, non_blocking=True))
        if self.flip:
            # One forward over [images; mirrored images]: fewer kernel launches than two calls.
            inputs = torch.cat([inputs, preprocess.flip_horizontal(inputs)], dim=0)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None and self.dtype != torch.float32:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                outputs = self.model(inputs)
        else:
            outputs = self.model(inputs)
        outputs = outputs.float()
        if self.flip:
            half = images_uint8_nchw.shape[0]
            outputs = outputs[:half] + outputs[half:]
        return outputs

    def embed_images(self, rgb_uint8_nhwc: np.ndarray) -> np.ndarray:
        images = _check_images(rgb_uint8_nhwc)
        was_training = self.model.training
        self.model.eval()
        chunks = []
        try:
            with torch.inference_mode():
                for start in range(0, images.shape[0], self.batch_size):
                    batch = torch.from_numpy(
                        np.ascontiguousarray(images[start:start + self.batch_size].transpose(0, 3, 1, 2)))
                    chunks.append(self._forward(batch).cpu().numpy())
        finally:
            self.model.train(was_training)
        if not chunks:
            return np.zeros((0, self._embedding_size or 0), dtype=np.float32)
        embeddings = np.concatenate(chunks).astype(np.float32, copy=False)
        self._embedding_size = embeddings.shape[1]
        return embeddings


class CheckpointEmbedder(ModelEmbedder):
    """Embed with a backbone rebuilt from a checkpoint directory or an arcface_torch weights file (see
    :mod:`arcface.checkpoint`; ``arch`` checks what an arcface_torch file holds)."""

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 batch_size: int = 64, flip: bool = True, dtype: torch.dtype | None = None,
                 arch: str | None = None) -> None:
        from arcface.checkpoint import load_backbone

        model, meta = load_backbone(path, map_location=device, arch=arch)
        model = model.to(memory_format=torch.channels_last)  # this embedder owns the model
        super().__init__(model, device=device, batch_size=batch_size, flip=flip, dtype=dtype,
                         channels_last=True)
        self.meta = meta
        embedding_size = meta["config"]["backbone"].get("embedding_size")
        if embedding_size:
            self._embedding_size = int(embedding_size)


class OnnxEmbedder:
    """Embed with an ONNX model through onnxruntime (the deployment contract of FORMATS.md section 7:
    input NCHW float32 RGB normalised outside the graph, one raw-embedding output)."""

    def __init__(self, path: str | os.PathLike[str], providers: list[str] | None = None,
                 batch_size: int = 64, flip: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - listed in install_requires
            raise ImportError("OnnxEmbedder needs onnxruntime: pip install onnxruntime") from exc
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX model")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = ort.SessionOptions()
        # Idle intra-op threads that spin steal the cores from whatever runs next (PyTorch, data
        # decoding) on small CPUs; evaluation batches are large enough not to need spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise ValueError(f"{path}: onnxruntime cannot load this model ({exc})") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{path}: expected one input and one output, got {len(inputs)} inputs and "
                             f"{len(outputs)} outputs")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.path = path
        self.batch_size = batch_size
        self.flip = flip
        size = outputs[0].shape[-1] if outputs[0].shape else None
        self._embedding_size = size if isinstance(size, int) else None

    @property
    def embedding_size(self) -> int:
        if self._embedding_size is None:
            self._embedding_size = _probe_embedding_size(self)
        return self._embedding_size

    def embed_images(self, rgb_uint8_nhwc: np.ndarray) -> np.ndarray:
        images = _check_images(rgb_uint8_nhwc)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            inputs = preprocess.normalize_numpy(images[start:start + self.batch_size])
            if self.flip:
                inputs = np.concatenate([inputs, preprocess.flip_horizontal_numpy(inputs)])
            outputs = self.session.run([self.output_name], {self.input_name: inputs})[0].astype(np.float32)
            if self.flip:
                half = outputs.shape[0] // 2
                outputs = outputs[:half] + outputs[half:]
            chunks.append(outputs)
        if not chunks:
            return np.zeros((0, self._embedding_size or 0), dtype=np.float32)
        return np.concatenate(chunks)


def build_embedder(path_or_model: str | os.PathLike[str] | nn.Module, device: str | torch.device = "cpu",
                   batch_size: int = 64, flip: bool = True, dtype: torch.dtype | None = None,
                   providers: list[str] | None = None, arch: str | None = None) -> Embedder:
    """A live model, an ``.onnx`` file, a checkpoint (directory, its files, or a run folder), or an
    arcface_torch weights file (``backbone.pth``, ``model.pt``; ``arch`` checks its architecture)."""
    if isinstance(path_or_model, nn.Module):
        return ModelEmbedder(path_or_model, device=device, batch_size=batch_size, flip=flip, dtype=dtype)
    path = Path(path_or_model)
    if path.suffix.lower() == ".onnx":
        if arch is not None:
            raise ValueError(f"{path}: an ONNX model needs no architecture (arch {arch!r} is for weight "
                             "files)")
        if providers is None and torch.device(device).type == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return OnnxEmbedder(path, providers=providers, batch_size=batch_size, flip=flip)
    return CheckpointEmbedder(path, device=device, batch_size=batch_size, flip=flip, dtype=dtype, arch=arch)


def model_identity(embedder: Embedder, given: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Which model an embedder runs, for reports: ``{"given", "kind", "path", "step", "config_sha256"}``.

    ``given`` is the path as the user wrote it (a run folder, say); ``path`` the file or checkpoint
    directory actually loaded (absolute); ``kind`` ``"checkpoint"``, ``"onnx"`` or ``"live model"``;
    ``step`` the training step and ``config_sha256`` the digest of the training config
    (:func:`arcface.checkpoint.config_digest`) from the checkpoint's ``meta.json`` or the metadata
    ``arcface-export`` writes into ONNX files; ``None`` where the model does not say.
    """
    identity: dict[str, Any] = {"given": None if given is None else str(given), "kind": "live model",
                                "path": None, "step": None, "config_sha256": None}
    if isinstance(embedder, CheckpointEmbedder):
        from arcface.checkpoint import config_digest

        imported = embedder.meta.get("source", {}).get("format") == "insightface"
        identity.update(kind="arcface_torch weights" if imported else "checkpoint",
                        path=str(Path(embedder.meta["_dir"]).resolve()),
                        step=embedder.meta.get("step"), config_sha256=config_digest(embedder.meta["config"]))
    elif isinstance(embedder, OnnxEmbedder):
        metadata = embedder.session.get_modelmeta().custom_metadata_map
        step = metadata.get("checkpoint_step", "")
        identity.update(kind="onnx", path=str(embedder.path.resolve()),
                        step=int(step) if step.isdigit() else None,
                        config_sha256=metadata.get("config_sha256") or None)
    return identity


def describe_model(identity: dict[str, Any] | None) -> str:
    """One line for consoles and reports, e.g. ``/runs/r100/checkpoints/step_00001200 (checkpoint, step 1200,
    config sha256 3f2a9c1b0d4e)``; the digest is shortened to 12 hex digits."""
    if identity is None:
        return "none (features read from folders)"
    step = "step unknown" if identity.get("step") is None else f"step {identity['step']}"
    digest = identity.get("config_sha256")
    config = f"config sha256 {digest[:12]}" if digest else "config unknown"
    where = identity.get("path") or identity.get("given") or "in memory"
    return f"{where} ({identity['kind']}, {step}, {config})"


def iter_batches(items: Iterable, batch_size: int) -> Iterator[list]:
    """Group an iterable into lists of at most ``batch_size`` items (the last may be shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_encoded(embedder: Embedder, encoded_images: Iterable[bytes], batch_size: int = 64,
                  sources: Iterable[str] | None = None, progress: object | None = None) -> np.ndarray:
    """Decode and embed a stream of encoded images, holding at most one batch of decoded images.

    ``sources`` (parallel to ``encoded_images``) names each image in decode errors, e.g.
    ``"lfw.bin image 17"``; ``progress`` is an optional tqdm bar advanced by images done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = iter(sources) if sources is not None else None
    chunks = []
    for index_base, batch in _enumerate_batches(encoded_images, batch_size):
        decoded = []
        for offset, data in enumerate(batch):
            source = next(names) if names is not None else f"image {index_base + offset}"
            decoded.append(preprocess.ensure_size(preprocess.decode_rgb(data, source=source)))
        chunks.append(embedder.embed_images(np.stack(decoded)))
        if progress is not None:
            progress.update(len(batch))
    if not chunks:
        return np.zeros((0, embedder.embedding_size), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _enumerate_batches(items: Iterable, batch_size: int) -> Iterator[tuple[int, list]]:
    start = 0
    for batch in iter_batches(items, batch_size):
        yield start, batch
        start += len(batch)
