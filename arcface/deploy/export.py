"""``arcface-export``: checkpoint -> ``model.onnx`` + ``model.json``, with proof of parity.

Pipeline (each step can fail loudly; nothing named ``model.onnx`` exists until all passed)::

    checkpoint (meta.json config) -> rebuild backbone -> torch.onnx.export (TorchScript exporter)
      -> fold BatchNorm (graph pass below) -> onnx.checker + deployment-contract check
      -> parity: onnxruntime vs the PyTorch model on synthetic faces and random inputs
      -> latency (onnxruntime vs PyTorch eager), size, optional model card on a verification pack
      -> metadata -> model.json, model.onnx (temp name + rename)

The graph honours FORMATS.md section 7: one input ``input`` ``[batch, 3, 112, 112]`` float32 RGB
normalised outside the graph (``(pixel - 127.5) / 127.5``, :mod:`arcface.preprocess`), symbolic batch,
one output ``embedding`` ``[batch, D]`` (raw, not normalised), fp32 weights, opset >= 17.

Exporter: the TorchScript exporter (``dynamo=False``) is the default because on torch 2.14 it exports
every registered backbone ~10x faster than the ``torch.export`` based one (r18 0.7 s vs 6 s, r100 7 s vs
23 s on the reference 2-core CPU), keeps ``Flatten`` (symbolic batch) and names nodes after modules.
``--exporter dynamo`` is supported and goes through the same folding, checks and parity.

BatchNorm folding happens on the ONNX graph, so it is exporter-agnostic and checked where it matters:
BN into a preceding ``Conv``/``Gemm``/``MatMul``; forward through ``Flatten`` into the head's ``Gemm``;
otherwise (an IR block's BN *before* a zero-padded convolution, which cannot be folded exactly into it) a
per-channel ``Mul`` + ``Add`` with the statistics pre-combined.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arcface.checkpoint import config_digest  # re-exported: the model card's config_sha256
from recordio_tools.cli_style import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    os_error_status,
)

__all__ = ["ExportError", "ParityError", "ExportOptions", "ExportResult", "export_checkpoint", "export_model",
           "fold_batchnorm", "FoldStats", "check_contract", "insightface_normalisation",
           "float_initializer_types", "graph_digest", "count_parameters", "parity_inputs", "parity_report",
           "measure_latency", "model_card", "config_digest", "main",
           "PARITY_MIN_COSINE", "PARITY_MAX_ABS_REL", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
FP16_FILE = "model_fp16.onnx"
INT8_FILE = "model_int8_dynamic.onnx"
REJECTED_FILE = "model.rejected.onnx"
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
MIN_OPSET = 17
# Parity tolerances of the fp32 model (the deployment contract): every embedding's cosine to the PyTorch
# embedding >= 0.99999, and max |difference| <= 1e-4 x the output scale (max |PyTorch embedding| of the
# same batch: embeddings are raw, so an absolute tolerance alone would mean nothing).
PARITY_MIN_COSINE = 0.99999
PARITY_MAX_ABS_REL = 1e-4
# Reduced-precision variants are approximations by design: looser, stated tolerances.
VARIANT_TOLERANCES = {"fp16": (0.999, 1e-2), "int8_dynamic": (0.99, 1e-1)}
PARITY_FACE_SEED = 20261124
CARD_FARS = (1e-3, 1e-4, 1e-5)

TRAINING_ONLY_OPS = ("Dropout", "BatchNormalization")
# InsightFace's loader reads a Sub*/_minus* plus a Mul*/_mul* name among the first 8 nodes as "the
# graph normalises its input itself" and then feeds raw pixels.
_LOADER_SUB_PREFIXES = ("Sub", "_minus")
_LOADER_MUL_PREFIXES = ("Mul", "_mul")
_LOADER_WINDOW = 8
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


class ExportError(RuntimeError):
    """The export, its graph checks or its output path failed (the message says which and why)."""


class ParityError(ExportError):
    """onnxruntime and PyTorch disagree beyond the stated tolerances."""


# --------------------------------------------------------------------------------------------------
# Graph pass: BatchNorm folding (numpy + onnx only)
# --------------------------------------------------------------------------------------------------


@dataclass
class FoldStats:
    """What :func:`fold_batchnorm` did with each BN node."""

    into_conv: int = 0
    into_gemm: int = 0
    into_following_gemm: int = 0
    as_scale_shift: int = 0
    constant_identities_removed: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Graph:
    """Mutable view of a GraphProto: initializers as float64/any numpy arrays, producer/consumer maps."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.ranks: dict[str, int] = {}
        self._counter = 0

    def unique(self, base: str) -> str:
        self._counter += 1
        return f"{base}__folded{self._counter}"

    def add_array(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        self.arrays[name] = array
        return name

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {out: node for node in self.graph.node for out in node.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node)
        return users

    def only_user(self, tensor: str, users: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
        """The single node reading ``tensor`` (None when several read it or it is a graph output)."""
        readers = users.get(tensor, [])
        if len(readers) != 1 or tensor in self.outputs:
            return None
        return readers[0]

    def write_back(self) -> None:
        """Replace the initializer list by the arrays still referenced by some node."""
        used = {name for node in self.graph.node for name in node.input}
        del self.graph.initializer[:]
        for name, array in self.arrays.items():
            if name in used:
                self.graph.initializer.append(numpy_helper.from_array(array, name))


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _resolve_constant_identities(g: _Graph, stats: FoldStats) -> None:
    """Drop ``Identity`` nodes that only alias an initializer (the TorchScript exporter emits them for
    deduplicated weights); their readers read the initializer directly, so BN parameters are visible."""
    alias: dict[str, str] = {}
    keep = []
    for node in g.graph.node:
        source = alias.get(node.input[0], node.input[0]) if node.input else None
        if node.op_type == "Identity" and source in g.arrays and node.output[0] not in g.outputs:
            alias[node.output[0]] = source
            stats.constant_identities_removed += 1
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del g.graph.node[:]
    g.graph.node.extend(keep)


def _bn_affine(g: _Graph, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(scale, shift)`` in float64 with ``BN(x) = x * scale + shift`` (inference mode)."""
    if len(bn.input) < 5 or any(name not in g.arrays for name in bn.input[1:5]):
        return None
    if _attr(bn, "training_mode", 0):
        return None
    gamma, beta, mean, var = (g.arrays[name].astype(np.float64) for name in bn.input[1:5])
    eps = float(_attr(bn, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _fold_into_conv(g: _Graph, conv: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> bool:
    if conv.op_type != "Conv" or conv.input[1] not in g.arrays:
        return False
    if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in g.arrays:
        return False
    weight = g.arrays[conv.input[1]].astype(np.float64)
    if weight.shape[0] != scale.shape[0]:
        return False
    bias = g.arrays[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
        else np.zeros(weight.shape[0])
    dtype = g.arrays[conv.input[1]].dtype
    new_weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    new_bias = bias * scale + shift
    inputs = [conv.input[0], g.add_array(conv.input[1], new_weight.astype(dtype)),
              g.add_array(conv.input[1] + ".bias", new_bias.astype(dtype))]
    del conv.input[:]
    conv.input.extend(inputs)
    return True


def _gemm_plain(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Gemm" and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
            and not _attr(node, "transA", 0))


def _fold_into_gemm(g: _Graph, gemm: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> bool:
    """``BN1d(x @ W^T + c)`` -> ``x @ (W * scale)^T + (c * scale + shift)`` (Gemm or a 2-D MatMul)."""
    if gemm.input[1] not in g.arrays:
        return False
    weight = g.arrays[gemm.input[1]]
    dtype = weight.dtype
    if gemm.op_type == "MatMul":
        # MatMul has no bias: becomes a Gemm, valid only for a 2-D left operand (then BN's channel
        # axis 1 is MatMul's last axis).
        if g.ranks.get(gemm.input[0]) != 2 or weight.ndim != 2:
            return False
        trans_b, bias = 0, np.zeros(weight.shape[1])
    elif _gemm_plain(gemm):
        trans_b = int(_attr(gemm, "transB", 0))
        if len(gemm.input) > 2 and gemm.input[2]:
            if gemm.input[2] not in g.arrays:
                return False
            bias = g.arrays[gemm.input[2]].astype(np.float64)
        else:
            bias = np.zeros(weight.shape[0 if trans_b else 1])
    else:
        return False
    out_features = weight.shape[0] if trans_b else weight.shape[1]
    if out_features != scale.shape[0] or bias.size not in (1, out_features):
        return False
    weight64 = weight.astype(np.float64)
    new_weight = weight64 * (scale[:, None] if trans_b else scale[None, :])
    new_bias = np.broadcast_to(bias.reshape(-1), (out_features,)) * scale + shift
    inputs = [gemm.input[0], g.add_array(gemm.input[1], new_weight.astype(dtype)),
              g.add_array(gemm.input[1] + ".bias", new_bias.astype(dtype))]
    gemm.op_type = "Gemm"
    del gemm.attribute[:]
    gemm.attribute.extend([helper.make_attribute("transB", trans_b)])
    del gemm.input[:]
    gemm.input.extend(inputs)
    return True


def _fold_into_following_gemm(g: _Graph, bn: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray,
                              users: dict[str, list[onnx.NodeProto]]) -> bool:
    """``Gemm(flatten(x * s + t))`` -> ``Gemm'(flatten(x))``: exact, since flattening keeps each channel's
    positions together (channel-major) and a linear layer absorbs a per-input scale and shift."""
    flatten = g.only_user(bn.output[0], users)
    if flatten is None:
        return False
    if flatten.op_type == "Flatten":
        if _attr(flatten, "axis", 1) != 1:
            return False
    elif flatten.op_type == "Reshape":
        target = g.arrays.get(flatten.input[1]) if len(flatten.input) > 1 else None
        if target is None or target.size != 2:
            return False
    else:
        return False
    gemm = g.only_user(flatten.output[0], users)
    if gemm is None or not _gemm_plain(gemm) or gemm.input[0] != flatten.output[0] \
            or gemm.input[1] not in g.arrays:
        return False
    if len(gemm.input) > 2 and gemm.input[2] and gemm.input[2] not in g.arrays:
        return False
    weight = g.arrays[gemm.input[1]]
    trans_b = int(_attr(gemm, "transB", 0))
    w = weight.astype(np.float64) if trans_b else weight.astype(np.float64).T  # [out, in]
    channels = scale.shape[0]
    if w.shape[1] % channels:
        return False
    if flatten.op_type == "Reshape" \
            and int(g.arrays[flatten.input[1]].reshape(-1)[1]) not in (-1, w.shape[1]):
        return False
    per_position = w.shape[1] // channels
    in_scale = np.repeat(scale, per_position)
    in_shift = np.repeat(shift, per_position)
    bias = g.arrays[gemm.input[2]].astype(np.float64).reshape(-1) if len(gemm.input) > 2 and gemm.input[2] \
        else np.zeros(1)
    new_w = w * in_scale[None, :]
    new_bias = np.broadcast_to(bias, (w.shape[0],)) + w @ in_shift
    dtype = weight.dtype
    new_weight = new_w if trans_b else new_w.T
    inputs = [gemm.input[0], g.add_array(gemm.input[1], np.ascontiguousarray(new_weight).astype(dtype)),
              g.add_array(gemm.input[1] + ".bias", new_bias.astype(dtype))]
    del gemm.input[:]
    gemm.input.extend(inputs)
    flatten.input[0] = bn.input[0]
    return True


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor shape inference can type. Runs on a weightless copy (weights declared as
    typed graph inputs instead of initializers), so a 500 MB model is not serialised for it."""
    graph = model.graph
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    light_graph = helper.make_graph(list(graph.node), graph.name, list(graph.input) + weights,
                                    list(graph.output))
    light = helper.make_model(light_graph, opset_imports=list(model.opset_import),
                              ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(light)
    ranks = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks


def fold_batchnorm(model: onnx.ModelProto) -> FoldStats:
    """Remove every inference-mode ``BatchNormalization`` node of ``model`` in place (see module doc).

    Raises ``ValueError`` naming the node for a BN it cannot fold (training mode, non-constant
    statistics, unknown input rank).
    """
    stats = FoldStats()
    g = _Graph(model.graph)
    _resolve_constant_identities(g, stats)
    g.ranks = _tensor_ranks(model)

    index = 0
    while index < len(model.graph.node):
        bn = model.graph.node[index]
        if bn.op_type != "BatchNormalization":
            index += 1
            continue
        affine = _bn_affine(g, bn)
        if affine is None:
            raise ValueError(f"BatchNormalization node {bn.name or bn.output[0]!r}: training mode or "
                             "non-constant statistics; export the model in eval mode")
        if len([o for o in bn.output if o]) != 1:
            raise ValueError(f"BatchNormalization node {bn.name!r} has running-statistics outputs "
                             "(training mode)")
        scale, shift = affine
        producers, users = g.producers(), g.consumers()
        producer = producers.get(bn.input[0])
        single = producer is not None and g.only_user(bn.input[0], users) is bn
        if single and producer.op_type == "Conv" and _fold_into_conv(g, producer, scale, shift):
            producer.output[0] = bn.output[0]
            stats.into_conv += 1
            del model.graph.node[index]
            continue
        if single and producer.op_type in ("Gemm", "MatMul") and _fold_into_gemm(g, producer, scale, shift):
            producer.output[0] = bn.output[0]
            stats.into_gemm += 1
            del model.graph.node[index]
            continue
        if _fold_into_following_gemm(g, bn, scale, shift, users):
            stats.into_following_gemm += 1
            del model.graph.node[index]
            continue
        rank = g.ranks.get(bn.input[0])
        if rank is None or rank < 2:
            raise ValueError(f"BatchNormalization node {bn.name or bn.output[0]!r}: input rank unknown; "
                             "cannot express it as a per-channel scale and shift")
        dtype = g.arrays[bn.input[1]].dtype
        shape = (-1,) + (1,) * (rank - 2)
        scale_name = g.add_array(f"{bn.input[1]}.scale", scale.reshape(shape).astype(dtype))
        shift_name = g.add_array(f"{bn.input[2]}.shift", shift.reshape(shape).astype(dtype))
        # Node names must not start with "Mul"/"Sub": InsightFace's loader reads those as in-graph
        # input normalisation (see insightface_normalisation).
        base = bn.name or bn.output[0]
        scaled = f"{bn.output[0]}__scaled"
        mul = helper.make_node("Mul", [bn.input[0], scale_name], [scaled], name=f"bn_affine_scale:{base}")
        add = helper.make_node("Add", [scaled, shift_name], [bn.output[0]], name=f"bn_affine_shift:{base}")
        del model.graph.node[index]
        model.graph.node.insert(index, add)
        model.graph.node.insert(index, mul)
        stats.as_scale_shift += 1
        index += 2
    g.write_back()
    # Stale shape annotations of renamed tensors would contradict the graph; the checker re-infers them.
    del model.graph.value_info[:]
    return stats


def float_initializer_types(model: onnx.ModelProto) -> Counter:
    """Element types of floating-point weights (initializers and Constant nodes), by ONNX type name."""
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return Counter(TensorProto.DataType.Name(t.data_type) for t in tensors if t.data_type in _FLOAT_TYPES)


def insightface_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """``(mean, std)`` that InsightFace's ``model_zoo`` ArcFace loader would apply to this graph's input.

    The loader looks at the names of the first 8 nodes: a ``Sub*``/``_minus*`` and a ``Mul*``/``_mul*``
    name mean "normalised inside the graph" (mean 0, std 1); anything else gets mean = std = 127.5.
    """
    names = [node.name for node in model.graph.node[:_LOADER_WINDOW]]
    has_sub = any(n.startswith(_LOADER_SUB_PREFIXES) for n in names)
    has_mul = any(n.startswith(_LOADER_MUL_PREFIXES) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in value_info.type.tensor_type.shape.dim]


def check_contract(model: onnx.ModelProto, embedding_size: int, input_size: int = 112,
                   output_name: str = "embedding", min_opset: int = 17) -> list[str]:
    """Every violation of the deployment contract (empty list = the graph is deployable)."""
    problems: list[str] = []
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        problems.append(f"expected exactly one input, got {[i.name for i in inputs]}")
    else:
        dims = _dims(inputs[0])
        if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"input {inputs[0].name!r} is not float32")
        if len(dims) != 4 or dims[1:] != [3, input_size, input_size]:
            problems.append(f"input shape {dims}, expected [batch, 3, {input_size}, {input_size}]")
        elif not isinstance(dims[0], str) or dims[0] == "?":
            problems.append(f"input batch dimension is {dims[0]!r}, expected a symbolic (dynamic) dimension")
    if len(graph.output) != 1:
        problems.append(f"expected exactly one output, got {[o.name for o in graph.output]}")
    else:
        out = graph.output[0]
        dims = _dims(out)
        if out.name != output_name:
            problems.append(f"output is named {out.name!r}, expected {output_name!r}")
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"output {out.name!r} is not float32")
        if len(dims) != 2 or dims[1] != embedding_size or not isinstance(dims[0], str):
            problems.append(f"output shape {dims}, expected [batch, {embedding_size}] with symbolic batch")
    ops = Counter(node.op_type for node in graph.node)
    for op in TRAINING_ONLY_OPS:
        if ops.get(op):
            problems.append(f"{ops[op]} {op} node(s) left in the graph (BN must be folded, Dropout removed)")
    if graph.node and graph.node[0].op_type in ("Sub", "Mul"):
        problems.append(f"the first node is {graph.node[0].op_type}: normalisation belongs outside the graph")
    if insightface_normalisation(model) != (127.5, 127.5):
        problems.append("the first nodes' names make InsightFace's loader assume in-graph normalisation")
    float_types = float_initializer_types(model)
    if set(float_types) - {"FLOAT"}:
        problems.append(f"non-fp32 floating-point weights: {dict(float_types)}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < min_opset:
        problems.append(f"opset {opset} < {min_opset}")
    return problems


def graph_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialised graph (nodes and weights, not metadata): proves which graph was checked."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of floating-point weight values in the graph."""
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES))


# --------------------------------------------------------------------------------------------------
# Export, parity, latency, model card
# --------------------------------------------------------------------------------------------------


def export_model(model, exporter: str = "torchscript", opset: int | None = None,
                 embedding_size: int | None = None) -> tuple[onnx.ModelProto, FoldStats]:
    """Export an fp32 ``nn.Module`` (eval mode, CPU) to a checked, BN-folded ONNX graph in memory.

    Raises :class:`ExportError` when the exporter fails, BN cannot be folded, ``onnx.checker`` rejects
    the graph or the graph breaks the deployment contract (:func:`check_contract`).
    """
    import torch

    from arcface import preprocess

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    low_precision = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low_precision:
        raise ExportError(f"the model has {low_precision} parameters; deployment graphs are fp32")
    size = preprocess.INPUT_SIZE
    # Batch 2, not 1: torch.export specialises size-1 dimensions, which would pin the batch.
    example = torch.zeros(2, 3, size, size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns that it is deprecated on every call; we chose it on purpose.
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                buffer = io.BytesIO()
                torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
                proto = onnx.load_from_string(buffer.getvalue())
            else:
                program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            dynamic_shapes=({0: torch.export.Dim("batch")},),
                                            optimize=True, verbose=False)
                proto = program.model_proto
    except Exception as exc:
        raise ExportError(f"the {exporter} exporter failed on {type(model).__name__}: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    try:
        stats = fold_batchnorm(proto)
    except ValueError as exc:
        raise ExportError(f"BatchNorm folding failed: {exc}") from exc
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the exported graph: {exc}") from exc
    if embedding_size is None:
        embedding_size = int(getattr(model, "embedding_size", 0)) or None
    problems = check_contract(proto, embedding_size or -1, input_size=size)
    if embedding_size is None:
        problems = [p for p in problems if not p.startswith("output shape")]
    if problems:
        raise ExportError("the exported graph breaks the deployment contract: " + "; ".join(problems))
    return proto, stats


def parity_inputs(batch_sizes: Sequence[int] = (1, 32), seed: int = 0) -> dict[str, np.ndarray]:
    """Named NCHW float32 input batches: synthetic faces (fixed identities, through the project's
    preprocessing) and uniform noise over the normalised pixel range, one of each per batch size."""
    from arcface import preprocess
    from recordio_tools.synth import render_identity_image

    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"parity batch sizes must be >= 1, got {list(batch_sizes)}")
    # Two images each of max(b)/2 identities: the set covers identity and nuisance variation.
    faces_rgb = np.stack([render_identity_image(i // 2, i % 2, seed=PARITY_FACE_SEED)[..., ::-1]  # BGR->RGB
                          for i in range(sizes[-1])])
    faces = preprocess.normalize_numpy(faces_rgb)
    rng = np.random.default_rng(seed)
    size = preprocess.INPUT_SIZE
    inputs = {}
    for b in sizes:
        inputs[f"faces_b{b}"] = faces[:b]
        inputs[f"random_b{b}"] = rng.uniform(-1.0, 1.0, (b, 3, size, size)).astype(np.float32)
    return inputs


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)


def parity_report(torch_model, run_onnx, inputs: dict[str, np.ndarray], min_cosine: float = PARITY_MIN_COSINE,
                  max_abs_rel: float = PARITY_MAX_ABS_REL, progress: bool = False) -> dict[str, Any]:
    """Compare ``run_onnx(x) -> [N, D]`` against ``torch_model`` (fp32, eval) on every input set.

    Per set: max absolute difference, output scale (max |PyTorch embedding|), their ratio, minimum
    per-embedding cosine and whether every output is finite; ``passed`` when all sets meet both
    tolerances.
    """
    import torch

    from recordio_tools.progress import progress_bar

    rows = []
    torch_model.eval()
    total = sum(int(batch.shape[0]) for batch in inputs.values())
    bar = progress_bar(total=total, desc="parity", unit="img", disable=not progress)
    for name, batch in inputs.items():
        with torch.inference_mode():
            expected = torch_model(torch.from_numpy(batch)).float().numpy()
        got = np.asarray(run_onnx(batch), dtype=np.float32)
        if got.shape != expected.shape:
            raise ParityError(f"parity set {name}: onnxruntime output shape {got.shape}, PyTorch "
                              f"{expected.shape}")
        # A non-finite PyTorch reference fails too: nothing can be proven against it.
        finite = bool(np.isfinite(got).all() and np.isfinite(expected).all())
        diff = float(np.abs(got.astype(np.float64) - expected).max()) if finite else float("inf")
        scale = float(np.abs(expected).max())
        rel = diff / max(scale, 1e-30)
        cosine = float(_row_cosine(got, expected).min()) if finite else float("nan")
        rows.append({"set": name, "batch": int(batch.shape[0]), "max_abs_diff": diff, "output_scale": scale,
                     "max_abs_diff_rel": rel, "min_cosine": cosine, "finite": finite,
                     "passed": bool(finite and cosine >= min_cosine and rel <= max_abs_rel)})
        bar.update(int(batch.shape[0]))
    bar.close()
    return {"tolerances": {"min_cosine": min_cosine, "max_abs_diff_rel_to_output_scale": max_abs_rel},
            "sets": rows, "passed": all(r["passed"] for r in rows)}


def _session(model_or_path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # onnxruntime's worker threads spin after each call by default; on a small CPU they then steal the
    # cores from the PyTorch reference run right after (parity, latency), distorting its timings.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = (model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto)
              else str(model_or_path))
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _runner(session):
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def measure_latency(torch_model, session, batch_sizes: Sequence[int] = (1, 32), runs: int = 5,
                    seed: int = 0) -> list[dict[str, float]]:
    """Median wall time per batch of onnxruntime (CPU) and PyTorch eager (fp32, inference mode), after
    one warm-up call each, on the same random input."""
    import torch

    if runs < 1:
        raise ValueError(f"latency runs must be >= 1, got {runs}")
    from arcface import preprocess

    rng = np.random.default_rng(seed)
    run_onnx = _runner(session)
    rows = []
    for b in batch_sizes:
        batch = rng.uniform(-1, 1, (b, 3, preprocess.INPUT_SIZE, preprocess.INPUT_SIZE)).astype(np.float32)
        tensor = torch.from_numpy(batch)

        def timed(fn) -> float:
            fn()
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return float(np.median(samples)) * 1e3

        ort_ms = timed(lambda: run_onnx(batch))  # noqa: B023 - called inside this iteration only
        with torch.inference_mode():
            torch_ms = timed(lambda: torch_model(tensor))  # noqa: B023
        rows.append({"batch": int(b), "onnxruntime_ms": ort_ms, "pytorch_ms": torch_ms,
                     "onnxruntime_images_per_s": b / ort_ms * 1e3, "speedup_vs_pytorch": torch_ms / ort_ms})
    return rows


def model_card(onnx_path: str | os.PathLike[str], pack_path: str | os.PathLike[str], batch_size: int = 64,
               fars: Sequence[float] = CARD_FARS, progress: bool = True) -> dict[str, Any]:
    """Operating points of the exported model on a verification pack (FORMATS.md section 4).

    Embeds every image and its mirror with the ONNX model (one embedding path:
    :class:`eval.embedder.OnnxEmbedder`), reports the standard 10-fold accuracy (flip-sum) and, for each
    target FAR, the cosine threshold with measured FAR/TAR, for both scoring styles: ``single`` (one
    embedding per face, what InsightFace's loader and the snippet in docs/deployment.md compute) and
    ``flip_sum`` (image + mirror summed, the evaluation protocol). A target FAR below 1 / (number of
    impostor pairs) cannot be measured on the pack: its entry says ``resolvable: false``.
    """
    from arcface import preprocess
    from eval import metrics
    from eval.embedder import OnnxEmbedder, iter_batches
    from eval.verification import evaluate_embeddings, load_pack
    from recordio_tools.progress import progress_bar

    pack = load_pack(pack_path)
    embedder = OnnxEmbedder(onnx_path, batch_size=batch_size, flip=False)
    single, mirrored = [], []
    bar = progress_bar(total=pack.num_images, desc=f"model card: {pack.name}", unit="img",
                       disable=not progress)
    start_index = 0
    for batch in iter_batches(pack.iter_encoded(), batch_size):
        images = np.stack([
            preprocess.ensure_size(preprocess.decode_rgb(data, f"{pack.path} image {start_index + i}"))
            for i, data in enumerate(batch)])
        single.append(embedder.embed_images(images))
        mirrored.append(embedder.embed_images(np.ascontiguousarray(images[:, :, ::-1])))
        start_index += len(batch)
        bar.update(len(batch))
    bar.close()
    single_emb, mirror_emb = np.concatenate(single), np.concatenate(mirrored)
    flip_sum = single_emb + mirror_emb
    result = evaluate_embeddings(pack.name, flip_sum, pack.issame)
    impostors = int((~pack.issame).sum())
    card: dict[str, Any] = {
        "pack": pack.name, "pack_file": str(pack.path), "num_pairs": pack.num_pairs,
        "num_impostor_pairs": impostors,
        "accuracy_mean": result.accuracy_mean, "accuracy_std": result.accuracy_std,
        "collapsed": result.collapsed,
        "accuracy_protocol": "10-fold, flip-sum embeddings, squared L2 distance (FORMATS.md section 4)",
        "score": "cosine similarity of L2-normalised embeddings; accept a pair when score >= threshold",
        "operating_points": {},
    }
    for style, embeddings in (("single", single_emb), ("flip_sum", flip_sum)):
        normalised = metrics.l2_normalize(embeddings)
        scores = (normalised[0::2] * normalised[1::2]).sum(axis=1)
        points = metrics.operating_points(scores, pack.issame, fars)
        for point in points:
            point["resolvable"] = bool(point["far_target"] * impostors >= 1.0)
        card["operating_points"][style] = points
    return card


@dataclass
class ExportOptions:
    """Options of :func:`export_checkpoint` (the CLI flags of the same names)."""

    exporter: str = "torchscript"
    opset: int | None = None
    check: bool = True
    parity_batch_sizes: tuple[int, ...] = (1, 32)
    latency_runs: int = 5
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    eval_pack: str | None = None
    eval_batch_size: int = 64
    fp16: bool = False
    int8: bool = False
    overwrite: bool = False
    keep_failed: bool = False
    seed: int = 0
    progress: bool = True
    arch: str | None = None  # checks what an arcface_torch weights file holds (arcface.checkpoint)

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        if self.opset is not None and self.opset < MIN_OPSET:
            raise ValueError(f"opset must be >= {MIN_OPSET}, got {self.opset}")
        for key in ("parity_batch_sizes", "latency_batch_sizes"):
            sizes = tuple(getattr(self, key))
            if not sizes or any(int(b) < 1 for b in sizes):
                raise ValueError(f"{key} must be a non-empty list of sizes >= 1, got {list(sizes)}")
            setattr(self, key, tuple(int(b) for b in sizes))
        if self.latency_runs < 0:
            raise ValueError(f"latency_runs must be >= 0 (0 skips latency), got {self.latency_runs}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


@dataclass
class ExportResult:
    """Where the files went and what ``model.json`` says."""

    output_dir: Path
    onnx_path: Path
    card_path: Path
    card: dict[str, Any]
    variants: dict[str, Path] = field(default_factory=dict)
    failed_variants: list[str] = field(default_factory=list)


def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_metadata(proto: onnx.ModelProto, values: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[arcface-export] {message}", file=sys.stderr, flush=True)


def _check_preprocess_contract(meta: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    from arcface import preprocess
    from arcface.checkpoint import CheckpointError

    current = preprocess.metadata()
    stored = meta.get("preprocess") or {}
    for key in ("input_size", "color_order", "mean", "std"):
        if key in stored and stored[key] != current[key]:
            raise CheckpointError(f"{checkpoint}: checkpoint was trained with preprocess.{key}="
                              f"{stored[key]!r} but this code normalises with {current[key]!r}; the ONNX "
                              "input contract would be wrong")
    return current


def _variant(kind: str, proto: onnx.ModelProto, fp32_path: Path, torch_model, inputs, progress: bool
             ) -> tuple[bytes | None, dict[str, Any]]:
    """Build an optional reduced-precision variant and its own parity numbers."""
    min_cos, max_rel = VARIANT_TOLERANCES[kind]
    if kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        variant = convert_float_to_float16(onnx.ModelProto.FromString(proto.SerializeToString()),
                                           keep_io_types=True)
        data = variant.SerializeToString()
    else:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        out_tmp = _tmp_name(fp32_path.parent / INT8_FILE)
        root_logger = logging.getLogger()
        level = root_logger.level
        # The quantiser logs a generic "consider pre-processing" warning on the root logger every call.
        root_logger.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32_path), str(out_tmp), weight_type=QuantType.QInt8)
            data = out_tmp.read_bytes()
        finally:
            root_logger.setLevel(level)
            out_tmp.unlink(missing_ok=True)
    _log(progress, f"{kind} variant: parity (min cosine >= {min_cos}, max |diff| <= {max_rel} x scale)")
    run_variant = _runner(_session(onnx.load_from_string(data)))
    report = parity_report(torch_model, run_variant, inputs, min_cos, max_rel, progress=progress)
    return data, report


def export_checkpoint(checkpoint: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                      options: ExportOptions | None = None) -> ExportResult:
    """Export a checkpoint to ``output_dir/model.onnx`` + ``model.json`` (see the module doc).

    Raises :class:`arcface.checkpoint.CheckpointError` for a bad checkpoint, ``FileExistsError`` when the
    outputs exist and ``overwrite`` is off, :class:`ExportError` when export or graph checks fail and
    :class:`ParityError` when onnxruntime and PyTorch disagree; in every failure no ``model.onnx`` is
    written (with ``keep_failed`` a rejected graph is kept as ``model.rejected.onnx`` for inspection).
    """
    import torch

    from arcface import __version__
    from arcface.checkpoint import backbone_kwargs, load_backbone

    options = options or ExportOptions()
    output_dir = Path(output_dir)
    onnx_path, card_path = output_dir / MODEL_FILE, output_dir / CARD_FILE
    planned = [onnx_path, card_path] + [output_dir / f for f, on in ((FP16_FILE, options.fp16),
                                                                      (INT8_FILE, options.int8)) if on]
    existing = [str(p) for p in planned if p.exists()]
    if existing and not options.overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir}: exists and is not a directory")
    if options.eval_pack and not Path(options.eval_pack).is_file():  # fail before the slow part
        raise FileNotFoundError(f"{options.eval_pack}: verification pack (--eval-pack) not found")

    model, meta = load_backbone(checkpoint, map_location="cpu", arch=options.arch)
    model = model.float().eval()
    name, kwargs = backbone_kwargs(meta["config"])
    embedding_size = int(kwargs.get("embedding_size") or getattr(model, "embedding_size", 0))
    contract = _check_preprocess_contract(meta, str(checkpoint))
    _log(options.progress, f"{meta['_dir']}: backbone {name} {kwargs}, step {meta.get('step')}")

    start = time.perf_counter()
    proto, fold_stats = export_model(model, options.exporter, options.opset, embedding_size)
    export_seconds = time.perf_counter() - start
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    _log(options.progress, f"exported with the {options.exporter} exporter (opset {opset}) in "
                           f"{export_seconds:.1f} s; BatchNorm folding {fold_stats.to_dict()}")
    digest = graph_digest(proto)
    output_dir.mkdir(parents=True, exist_ok=True)
    graph_bytes = proto.SerializeToString()
    threads = torch.get_num_threads()

    card: dict[str, Any] = {
        "format": "arcface-torch-pfc onnx model card", "card_version": 1,
        "model_file": MODEL_FILE, "backbone": name, "backbone_kwargs": kwargs,
        "embedding_size": embedding_size,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, *contract["input_size"]], "dtype": "float32",
                  "layout": contract["layout"], "color_order": contract["color_order"],
                  "mean": contract["mean"], "std": contract["std"],
                  "normalisation": contract["normalisation"] + " (outside the graph)"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", embedding_size], "dtype": "float32",
                   "normalised": False, "similarity": "cosine"},
        "checkpoint": {"path": str(meta["_dir"]), "step": meta.get("step"),
                       "format_version": meta.get("format_version")},
        "config_sha256": config_digest(meta["config"]), "project_version": __version__,
        "exporter": {"name": options.exporter, "torch": torch.__version__, "onnx": onnx.__version__,
                     "opset": opset, "seconds": export_seconds, "batchnorm_folding": fold_stats.to_dict()},
        "graph_sha256": digest, "parameters": count_parameters(proto),
        "size_bytes": len(graph_bytes),
        "insightface_loader_normalisation": list(insightface_normalisation(proto)),
    }
    variants: dict[str, bytes] = {}
    failed_variants: list[str] = []
    fp32_tmp = _tmp_name(onnx_path)
    try:
        fp32_tmp.write_bytes(graph_bytes)
        # Same thread count as PyTorch: latency then compares engines, not thread pools.
        session = _session(fp32_tmp, threads=threads)
        import onnxruntime as ort

        card["exporter"]["onnxruntime"] = ort.__version__
        inputs = parity_inputs(options.parity_batch_sizes, options.seed) if (options.check or options.fp16
                                                                            or options.int8) else {}
        if options.check:
            _log(options.progress, f"parity on {len(inputs)} input sets (min cosine >= {PARITY_MIN_COSINE}, "
                                   f"max |diff| <= {PARITY_MAX_ABS_REL} x output scale)")
            card["parity"] = parity_report(model, _runner(session), inputs, progress=options.progress)
            _log(options.progress, format_parity(card["parity"]))
            if not card["parity"]["passed"]:
                if options.keep_failed:
                    os.replace(fp32_tmp, output_dir / REJECTED_FILE)
                raise ParityError("onnxruntime and PyTorch disagree beyond tolerance:\n"
                                  + format_parity(card["parity"]))
        else:
            card["parity"] = {"skipped": True, "passed": None}
        if options.latency_runs:
            _log(options.progress, f"latency at batch {list(options.latency_batch_sizes)} "
                                   f"({options.latency_runs} runs, median)")
            card["latency"] = {"device": "CPU", "pytorch_threads": threads,
                               "onnxruntime_threads": threads, "runs": options.latency_runs,
                               "rows": measure_latency(model, session, options.latency_batch_sizes,
                                                       options.latency_runs, options.seed)}
            _log(options.progress, format_latency(card["latency"]["rows"]))
        if options.eval_pack:
            card["model_card"] = model_card(fp32_tmp, options.eval_pack, options.eval_batch_size,
                                            progress=options.progress)
        for kind, enabled, filename in (("fp16", options.fp16, FP16_FILE),
                                        ("int8_dynamic", options.int8, INT8_FILE)):
            if not enabled:
                continue
            data, report = _variant(kind, proto, fp32_tmp, model, inputs, options.progress)
            _log(options.progress, f"{kind}: " + format_parity(report))
            card.setdefault("variants", {})[kind] = {
                "file": filename if report["passed"] else None, "size_bytes": len(data), "parity": report,
                "note": "not for benchmark validators: weights are not fp32" if report["passed"]
                else "rejected: beyond its parity tolerance, not written"}
            if report["passed"]:
                variants[filename] = data
            else:
                failed_variants.append(kind)
    except BaseException:
        fp32_tmp.unlink(missing_ok=True)
        raise

    metadata = {
        "backbone": name, "embedding_size": str(embedding_size), "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME, "input_size": contract["input_size"],
        "color_order": contract["color_order"],
        "layout": contract["layout"], "mean": str(contract["mean"]), "std": str(contract["std"]),
        "normalisation": contract["normalisation"], "config_sha256": card["config_sha256"],
        "project_version": __version__, "checkpoint_step": str(meta.get("step")),
        "exporter": options.exporter,
        "graph_sha256": digest,
        "parity": {"passed": card["parity"]["passed"],
                   "min_cosine": min((r["min_cosine"] for r in card["parity"].get("sets", [])), default=None),
                   "max_abs_diff_rel": max((r["max_abs_diff_rel"] for r in card["parity"].get("sets", [])),
                                           default=None),
                   "tolerances": card["parity"].get("tolerances")},
    }
    if "model_card" in card:
        mc = card["model_card"]
        metadata["model_card"] = {"pack": mc["pack"], "accuracy": mc["accuracy_mean"],
                                  "thresholds_single": {str(p["far_target"]): p["threshold"]
                                                        for p in mc["operating_points"]["single"]}}
    _set_metadata(proto, metadata)
    card["onnx_metadata"] = {e.key: e.value for e in proto.metadata_props}
    try:
        for filename, data in variants.items():
            _write_atomic(output_dir / filename, data)
        if options.overwrite:
            # Outputs of an earlier export that this one does not produce would describe another graph.
            for stale in (FP16_FILE, INT8_FILE, REJECTED_FILE):
                if stale not in variants:
                    (output_dir / stale).unlink(missing_ok=True)
        _write_atomic(card_path, (json.dumps(card, indent=2, sort_keys=False) + "\n").encode())
        # The graph checked above plus metadata: written under a temp name, renamed last.
        fp32_tmp.write_bytes(proto.SerializeToString())
        os.replace(fp32_tmp, onnx_path)
    finally:
        fp32_tmp.unlink(missing_ok=True)
    _log(options.progress, f"wrote {onnx_path} ({len(graph_bytes) / 2**20:.1f} MiB) and {card_path}")
    return ExportResult(output_dir, onnx_path, card_path, card,
                        {filename: output_dir / filename for filename in variants}, failed_variants)


def format_parity(report: dict[str, Any]) -> str:
    """Parity table as text."""
    lines = [f"{'set':<14}{'batch':>6}{'max|diff|':>12}{'scale':>11}{'rel':>10}{'min cos':>12}  ok"]
    for r in report["sets"]:
        lines.append(f"{r['set']:<14}{r['batch']:>6}{r['max_abs_diff']:>12.3g}{r['output_scale']:>11.3g}"
                     f"{r['max_abs_diff_rel']:>10.2g}{r['min_cosine']:>12.8f}  "
                     f"{'yes' if r['passed'] else 'NO'}")
    return "\n".join(lines)


def format_latency(rows: list[dict[str, float]]) -> str:
    """Latency table as text."""
    lines = [f"{'batch':>5} {'onnxruntime ms':>15} {'pytorch ms':>11} {'ort img/s':>10} {'ort speedup':>12}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['onnxruntime_ms']:>15.1f} {r['pytorch_ms']:>11.1f} "
                     f"{r['onnxruntime_images_per_s']:>10.1f} {r['speedup_vs_pytorch']:>11.2f}x")
    return "\n".join(lines)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="arcface-export",
        description="Export a checkpoint to ONNX (model.onnx + model.json) and prove parity with PyTorch.",
        epilog="exit status: 0 exported, parity passed; 1 failed while running (export, graph checks, parity "
               "of the model or of a variant); 2 bad arguments or checkpoint, or outputs exist; 130 "
               "interrupted")
    parser.add_argument("--model", help="checkpoint directory (meta.json + backbone.pt), or a run folder "
                                        "(its latest checkpoint is used)")
    parser.add_deprecated_positional("checkpoint", "CHECKPOINT", "model", "--model")
    parser.require("model", "--model")
    parser.add_argument("-o", "--output", required=True,
                        help="output directory for model.onnx and model.json")
    parser.add_argument("--arch", default=None,
                        help="the checkpoint may also be an arcface_torch weights file (backbone.pth, "
                             "model.pt); --arch r18|r34|r50|r100|r200|mbf|mbf_large checks its architecture "
                             "(optional: the file's keys and shapes name it)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                        help="torch.onnx exporter: torchscript (dynamo=False) or dynamo (torch.export)")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, >= {MIN_OPSET} (default: {DEFAULT_OPSET['torchscript']} with "
                             f"torchscript, {DEFAULT_OPSET['dynamo']} with dynamo)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the onnxruntime-vs-PyTorch parity check (not recommended)")
    parser.add_argument("--parity-batch-sizes", type=_sizes, default=(1, 32), metavar="B[,B..]",
                        help="batch sizes of the parity sets (default: 1,32)")
    parser.add_argument("--latency-runs", type=int, default=5, help="timed runs per batch size (0 skips)")
    parser.add_argument("--latency-batch-sizes", type=_sizes, default=(1, 32), metavar="B[,B..]",
                        help="batch sizes of the latency measurement (default: 1,32)")
    parser.add_argument("--eval-pack", default=None,
                        help="verification .bin pack for the model card (thresholds at FAR 1e-3/1e-4/1e-5)")
    parser.add_argument("--eval-batch-size", type=int, default=64,
                        help="images per forward pass when embedding --eval-pack")
    parser.add_argument("--fp16", action="store_true",
                        help=f"also write {FP16_FILE} (fp16 weights, fp32 I/O)")
    parser.add_argument("--int8", action="store_true",
                        help=f"also write {INT8_FILE} (onnxruntime dynamic int8 quantisation)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--keep-failed", action="store_true",
                        help="keep a graph that failed parity as model.rejected.onnx for inspection")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parity/latency inputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``arcface-export``: 0 on success, 1 when the export, its checks or parity fail while
    running, 2 on bad arguments or input (checkpoint, existing outputs), 130 when interrupted."""
    from arcface.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        options = ExportOptions(exporter=args.exporter, opset=args.opset, check=args.check,
                                parity_batch_sizes=args.parity_batch_sizes, latency_runs=args.latency_runs,
                                latency_batch_sizes=args.latency_batch_sizes, eval_pack=args.eval_pack,
                                eval_batch_size=args.eval_batch_size, fp16=args.fp16, int8=args.int8,
                                overwrite=args.overwrite, keep_failed=args.keep_failed, seed=args.seed,
                                progress=not args.quiet)
        options.arch = args.arch
        result = export_checkpoint(args.model, args.output, options)
    except ParityError as exc:
        print(f"arcface-export: parity check FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"arcface-export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as exc:
        print(f"arcface-export: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"arcface-export: error: {exc}", file=sys.stderr)
        return os_error_status(exc)
    except KeyboardInterrupt:
        print("arcface-export: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    parity = result.card["parity"]
    status = "skipped" if parity.get("skipped") else "passed"
    print(f"{result.onnx_path}: parity {status}; card {result.card_path}")
    for path in result.variants.values():
        print(f"{path}: variant parity passed")
    if result.failed_variants:
        print(f"arcface-export: variant(s) {', '.join(result.failed_variants)} beyond their parity "
              f"tolerance; not written (numbers in {result.card_path})", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
