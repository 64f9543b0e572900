"""Load backbone weights written by InsightFace ``arcface_torch`` into the registry's networks.

    >>> from backbones import load_insightface_backbone
    >>> model = load_insightface_backbone("ms1mv3_arcface_r100/backbone.pth")   # eval mode, r100

arcface_torch's IResNet and MobileFaceNet compute exactly what ``backbones.iresnet`` and
``backbones.mobilefacenet`` compute (same layers, order, eps, padding, groups, flatten order); only the
module names differ. The mapping, arcface_torch key prefix -> registry key prefix:

IResNet (``r18`` ``r34`` ``r50`` ``r100`` ``r200``)::

    conv1. bn1. prelu.                     -> stem.0. stem.1. stem.2.
    layer{i}.{j}.{bn1,conv1,bn2,prelu,conv2,bn3}.
                                           -> stages.{i-1}.{j}.{same names}.
    layer{i}.{j}.downsample.{0,1}.         -> stages.{i-1}.{j}.shortcut.{0,1}.
    bn2. fc. features.                     -> head.bn. head.fc. head.features.

MobileFaceNet (``mbf`` = ``mobilefacenet``, ``mbf_large`` = ``mobilefacenet_large``, or any
``blocks``/``scale``: ``scale`` is our ``width``)::

    layers.0.layers.{a}.                   -> stem.0.{a}.
    layers.1.layers.{a}.                   -> stem.1.{a}.             (blocks[0] == 1)
    layers.1.layers.{k}.layers.{a}.layers.{b}.
                                           -> stem.{1+k}.body.{a}.{b}. (blocks[0] > 1)
    layers.{2,4,6}.layers.{a}.layers.{b}.  -> stages.{0,1,2}.0.body.{a}.{b}.
    layers.{3,5,7}.layers.{k}.layers.{a}.layers.{b}.
                                           -> stages.{0,1,2}.{1+k}.body.{a}.{b}.
    conv_sep.layers.{a}.                   -> conv_sep.{a}.
    features.layers.0.layers.{a}.          -> gdc.{a}.                (7x7 depthwise GDC + BN)
    features.layers.2. features.layers.3.  -> fc. features.           (Linear, BatchNorm1d)

The architecture and embedding size are read from the keys and shapes: IResNet's units per stage name
the layout, ``fc.weight`` gives the embedding size (and must take 512x7x7 inputs, i.e. 112x112 faces);
MobileFaceNet's first convolution gives ``scale``, its unit counts ``blocks``. Loading is strict: every
key is used, every shape checked, nothing is filled with defaults (arcface_torch keeps IResNet's
``features.weight`` at 1.0 without training it; whatever the file holds is copied).

Files are read with ``torch.load(weights_only=True)``: a file that would need to run code to unpickle
is refused, never executed. Single-device code: no process group, no device placement.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["InsightFaceWeightsError", "InsightFaceBackbone", "SUPPORTED_ARCHS", "read_weights_file",
           "convert_insightface_state_dict", "load_insightface_backbone", "build_converted",
           "insightface_to_registry_key", "registry_to_insightface_key"]

# Registry names of the architectures arcface_torch's ``get_model`` builds that exist here.
SUPPORTED_ARCHS = ("r18", "r34", "r50", "r100", "r200", "mobilefacenet", "mobilefacenet_large")
_RUN_CHECKPOINT_KEY = "state_dict_backbone"  # the backbone inside a run's checkpoint_gpu_{rank}.pt
_SHOWN = 6  # keys listed per kind in an error message


class InsightFaceWeightsError(ValueError):
    """A file or state dict is not (loadable as) an arcface_torch backbone; the message says why."""


@dataclasses.dataclass(frozen=True)
class InsightFaceBackbone:
    """An arcface_torch state dict converted for the registry: ``create_backbone(name, **kwargs)`` then
    ``load_state_dict(state_dict)`` rebuilds it. ``arch`` is arcface_torch's name (``r100``, ``mbf``, ...);
    ``key_map`` maps each arcface_torch key to its registry key (e.g. for optimiser state by name)."""

    name: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    arch: str
    source: str
    key_map: dict[str, str] = dataclasses.field(default_factory=dict)  # arcface_torch key -> registry key

    def describe(self) -> str:
        extra = {k: v for k, v in self.kwargs.items() if k != "embedding_size"}
        spec = f", {', '.join(f'{k}={v}' for k, v in extra.items())}" if extra else ""
        return (f"arcface_torch {self.arch} ({self.name}, embedding size {self.kwargs['embedding_size']}"
                f"{spec}) from {self.source}")


# -- reading a file --------------------------------------------------------------------------------------

def read_weights_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone state dict in an arcface_torch file, and a description of where it came from.

    Accepts ``backbone.pth`` / ``model.pt`` (a bare state dict, possibly with DDP's ``module.`` prefix)
    and run checkpoints ``checkpoint_gpu_{rank}.pt`` (their ``state_dict_backbone``).
    """
    path = Path(path)
    if not path.is_file():
        raise InsightFaceWeightsError(f"{path}: no such weights file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler: a GLOBAL outside its allow-list is an object that unpickling would
        # construct by calling code; anything else is bytes that are not a pickle torch wrote.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is not None:
            raise InsightFaceWeightsError(
                f"{path}: refused: the file holds Python objects other than tensors and plain containers, "
                f"and unpickling them could run code; it was not loaded ({refused})") from None
        text, marker = str(exc), "WeightsUnpickler error:"
        after = text.split(marker, 1)[1].strip().splitlines() if marker in text else []
        detail = after[0] if after else (lines[0] if lines else type(exc).__name__)
        raise InsightFaceWeightsError(f"{path}: not a PyTorch weights file ({detail})") from None
    except Exception as exc:  # truncated zip, bad header, wrong format
        raise InsightFaceWeightsError(f"{path}: cannot read: not a complete PyTorch file (truncated or "
                                      f"corrupted?): {type(exc).__name__}: {exc}") from None
    source = str(path)
    if isinstance(loaded, Mapping) and _RUN_CHECKPOINT_KEY in loaded:
        loaded = loaded[_RUN_CHECKPOINT_KEY]
        source = f"{path} ({_RUN_CHECKPOINT_KEY} of a run checkpoint)"
    return _as_state_dict(loaded, source), source


def _as_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise InsightFaceWeightsError(f"{source}: not a backbone state dict (got {type(obj).__name__})")
    if not obj:
        raise InsightFaceWeightsError(f"{source}: not a backbone state dict (an empty mapping)")
    not_tensors = [str(k) for k, v in obj.items()
                   if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InsightFaceWeightsError(f"{source}: not a backbone state dict: {len(not_tensors)} entries are "
                                      f"not named tensors (e.g. {', '.join(not_tensors[:_SHOWN])})")
    state = dict(obj)
    # Weights saved from a DistributedDataParallel wrapper instead of its .module
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# -- key mapping -----------------------------------------------------------------------------------------

_IRESNET_TOP = {"conv1.": "stem.0.", "bn1.": "stem.1.", "prelu.": "stem.2.", "bn2.": "head.bn.",
                "fc.": "head.fc.", "features.": "head.features."}
_IRESNET_UNIT = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_MBF_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]] = [
    (re.compile(r"^layers\.0\.layers\.(\d+)\.(.+)$"), lambda m, b0: f"stem.0.{m[1]}.{m[2]}"),
    (re.compile(r"^layers\.1\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(.+)$"),
     lambda m, b0: f"stem.{1 + int(m[1])}.body.{m[2]}.{m[3]}.{m[4]}" if b0 > 1 else ""),
    (re.compile(r"^layers\.1\.layers\.(\d+)\.([^.]+)$"),
     lambda m, b0: f"stem.1.{m[1]}.{m[2]}" if b0 == 1 else ""),
    (re.compile(r"^layers\.([246])\.layers\.(\d+)\.layers\.(\d+)\.(.+)$"),
     lambda m, b0: f"stages.{(int(m[1]) - 2) // 2}.0.body.{m[2]}.{m[3]}.{m[4]}"),
    (re.compile(r"^layers\.([357])\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(.+)$"),
     lambda m, b0: f"stages.{(int(m[1]) - 3) // 2}.{1 + int(m[2])}.body.{m[3]}.{m[4]}.{m[5]}"),
    (re.compile(r"^conv_sep\.layers\.(\d+)\.(.+)$"), lambda m, b0: f"conv_sep.{m[1]}.{m[2]}"),
    (re.compile(r"^features\.layers\.0\.layers\.(\d+)\.(.+)$"), lambda m, b0: f"gdc.{m[1]}.{m[2]}"),
    (re.compile(r"^features\.layers\.2\.(.+)$"), lambda m, b0: f"fc.{m[1]}"),
    (re.compile(r"^features\.layers\.3\.(.+)$"), lambda m, b0: f"features.{m[1]}"),
]


def insightface_to_registry_key(key: str, family: str, first_blocks: int = 1) -> str | None:
    """The registry key of an arcface_torch key (``None`` if it has no place in that family).

    ``family`` is ``"iresnet"`` or ``"mobilefacenet"``; ``first_blocks`` is MobileFaceNet's ``blocks[0]``
    (1: a plain convolution block, more: residual units), which decides how ``layers.1`` maps.
    """
    if family == "iresnet":
        unit = _IRESNET_UNIT.match(key)
        if unit:
            rest = unit[3]
            if rest.startswith("downsample."):
                rest = "shortcut." + rest[len("downsample."):]
            return f"stages.{int(unit[1]) - 1}.{unit[2]}.{rest}"
        for prefix, target in _IRESNET_TOP.items():
            if key.startswith(prefix):
                return target + key[len(prefix):]
        return None
    if family == "mobilefacenet":
        for pattern, target in _MBF_PATTERNS:
            match = pattern.match(key)
            if match:
                return target(match, first_blocks) or None
        return None
    raise ValueError(f"unknown family {family!r}")


_IRESNET_TOP_BACK = {target: prefix for prefix, target in _IRESNET_TOP.items()}
_REGISTRY_IRESNET_UNIT = re.compile(r"^stages\.([0-3])\.(\d+)\.(.+)$")
_REGISTRY_MBF_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]] = [
    (re.compile(r"^stem\.0\.(\d+)\.(.+)$"), lambda m, b0: f"layers.0.layers.{m[1]}.{m[2]}"),
    (re.compile(r"^stem\.1\.(\d+)\.([^.]+)$"), lambda m, b0: f"layers.1.layers.{m[1]}.{m[2]}"),
    (re.compile(r"^stem\.(\d+)\.body\.(\d+)\.(\d+)\.(.+)$"),
     lambda m, b0: f"layers.1.layers.{int(m[1]) - 1}.layers.{m[2]}.layers.{m[3]}.{m[4]}"),
    (re.compile(r"^stages\.([0-2])\.0\.body\.(\d+)\.(\d+)\.(.+)$"),
     lambda m, b0: f"layers.{2 + 2 * int(m[1])}.layers.{m[2]}.layers.{m[3]}.{m[4]}"),
    (re.compile(r"^stages\.([0-2])\.(\d+)\.body\.(\d+)\.(\d+)\.(.+)$"),
     lambda m, b0: f"layers.{3 + 2 * int(m[1])}.layers.{int(m[2]) - 1}.layers.{m[3]}.layers.{m[4]}.{m[5]}"),
    (re.compile(r"^conv_sep\.(\d+)\.(.+)$"), lambda m, b0: f"conv_sep.layers.{m[1]}.{m[2]}"),
    (re.compile(r"^gdc\.(\d+)\.(.+)$"), lambda m, b0: f"features.layers.0.layers.{m[1]}.{m[2]}"),
    (re.compile(r"^fc\.(.+)$"), lambda m, b0: f"features.layers.2.{m[1]}"),
    (re.compile(r"^features\.(.+)$"), lambda m, b0: f"features.layers.3.{m[1]}"),
]


def registry_to_insightface_key(key: str, family: str) -> str | None:
    """The inverse of :func:`insightface_to_registry_key` (``None``: no arcface_torch name for ``key``)."""
    if family == "iresnet":
        unit = _REGISTRY_IRESNET_UNIT.match(key)
        if unit:
            rest = unit[3]
            if rest.startswith("shortcut."):
                rest = "downsample." + rest[len("shortcut."):]
            return f"layer{int(unit[1]) + 1}.{unit[2]}.{rest}"
        for target, prefix in _IRESNET_TOP_BACK.items():
            if key.startswith(target):
                return prefix + key[len(target):]
        return None
    if family == "mobilefacenet":
        for pattern, source in _REGISTRY_MBF_PATTERNS:
            match = pattern.match(key)
            if match:
                return source(match, 0)
        return None
    raise ValueError(f"unknown family {family!r}")


# -- architecture detection ------------------------------------------------------------------------------

def _family_of(state: Mapping[str, torch.Tensor]) -> str | None:
    if "layer1.0.conv1.weight" in state or "fc.weight" in state and "bn2.weight" in state:
        return "iresnet"
    if "conv_sep.layers.0.weight" in state or "layers.0.layers.0.weight" in state:
        return "mobilefacenet"
    return None


def _count_units(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m[1]) for m in (regex.match(k) for k in state) if m}
    return max(indices) + 1 if indices else 0


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise InsightFaceWeightsError(f"{source}: missing key {key!r}, which names the architecture")
    return tuple(state[key].shape)


def _detect(state: Mapping[str, torch.Tensor], family: str, source: str) -> tuple[str, dict[str, Any], str]:
    """``(registry name, kwargs, arcface_torch name)`` of a state dict of ``family``."""
    from backbones.iresnet import LAYOUTS, STAGE_WIDTHS

    if family == "iresnet":
        units = tuple(_count_units(state, rf"^layer{i}\.(\d+)\.") for i in range(1, 5))
        layouts = {layout: name for name, layout in LAYOUTS.items()}
        if units not in layouts:
            known = ", ".join(f"{n} {lay}" for n, lay in LAYOUTS.items())
            raise InsightFaceWeightsError(f"{source}: an IResNet with {units} units per stage, which is none "
                                          f"of the supported layouts ({known})")
        fc = _shape(state, "fc.weight", source)
        expected_in = STAGE_WIDTHS[-1] * 7 * 7
        if len(fc) != 2 or fc[1] != expected_in:
            raise InsightFaceWeightsError(f"{source}: fc.weight has shape {list(fc)}; the 112x112 IResNet's "
                                          f"fc takes {expected_in} inputs (512 x 7 x 7): trained at another "
                                          "input size?")
        name = layouts[units]
        return name, {"embedding_size": fc[0]}, name
    stem = _shape(state, "layers.0.layers.0.weight", source)
    if len(stem) != 4 or stem[0] % 64:
        raise InsightFaceWeightsError(f"{source}: layers.0.layers.0.weight has shape {list(stem)}; "
                                      "MobileFaceNet's first convolution has 64 x scale output channels")
    width = stem[0] // 64
    if "layers.1.layers.0.weight" in state:  # blocks[0] == 1: a plain ConvBlock
        first = 1
    else:
        first = _count_units(state, r"^layers\.1\.layers\.(\d+)\.")
    blocks = (first, *(_count_units(state, rf"^layers\.{i}\.layers\.(\d+)\.") for i in (3, 5, 7)))
    if min(blocks) < 1:
        raise InsightFaceWeightsError(f"{source}: MobileFaceNet stage unit counts {blocks}: a stage is "
                                      "missing (the file is incomplete)")
    fc = _shape(state, "features.layers.2.weight", source)
    kwargs: dict[str, Any] = {"embedding_size": fc[0]}
    if (blocks, width) == ((1, 4, 6, 2), 2):
        return "mobilefacenet", kwargs, "mbf"
    if (blocks, width) == ((2, 8, 12, 4), 4):
        return "mobilefacenet_large", kwargs, "mbf_large"
    kwargs.update(width=width, blocks=list(blocks))
    return "mobilefacenet", kwargs, f"MobileFaceNet(blocks={blocks}, scale={width})"


def _family_of_name(name: str) -> str:
    return "mobilefacenet" if name.startswith("mobilefacenet") else "iresnet"


def _expected_state(name: str, kwargs: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Keys and shapes of a registry network, built on the meta device (no memory, no initialisation)."""
    from backbones import create_backbone

    with torch.device("meta"):
        model = create_backbone(name, **kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}


def _closest(state: Mapping[str, torch.Tensor], embedding_size: int) -> str:
    """The supported architecture whose tensor shapes best match ``state``'s.

    Compared as multisets of shapes (Jaccard), so a renamed or partly damaged state dict still points at
    the network it came from.
    """
    have = Counter(tuple(v.shape) for v in state.values())
    scores = []
    for name in SUPPORTED_ARCHS:
        shapes = _expected_state(name, {"embedding_size": embedding_size}).values()
        expected = Counter(tuple(shape) for shape in shapes)
        scores.append(((have & expected).total() / (have | expected).total(), name))
    return max(scores)[1]


def _embedding_size_guess(state: Mapping[str, torch.Tensor]) -> int:
    for key in ("fc.weight", "features.layers.2.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return 512


def convert_insightface_state_dict(state: Mapping[str, torch.Tensor], arch: str | None = None,
                                   source: str = "state dict") -> InsightFaceBackbone:
    """Map an arcface_torch backbone state dict onto the registry, checking every key and shape.

    ``arch`` (a registry name or alias: ``r100``, ``iresnet50``, ``mbf``, ``mbf_large``, ...) asserts
    what the weights must be; without it the architecture is read from the keys and shapes. Raises
    :class:`InsightFaceWeightsError` naming missing, unexpected and mis-shaped keys and the closest
    supported architecture.
    """
    from backbones import canonical_name

    state = _as_state_dict(state, source)
    wanted = None
    if arch is not None:
        try:
            wanted = canonical_name(arch)
        except ValueError as exc:
            raise InsightFaceWeightsError(f"arch {arch!r}: {exc}") from None
        if wanted not in SUPPORTED_ARCHS:
            raise InsightFaceWeightsError(f"arch {arch!r}: arcface_torch has no {wanted}; supported: "
                                          f"{', '.join(SUPPORTED_ARCHS)}")
    family = _family_of(state) or (_family_of_name(wanted) if wanted else None)
    if family is None:
        closest = _closest(state, _embedding_size_guess(state))
        keys = list(state)
        raise InsightFaceWeightsError(
            f"{source}: not an arcface_torch IResNet or MobileFaceNet state dict (keys such as "
            f"{', '.join(keys[:_SHOWN])}); closest supported architecture: {closest}")
    if wanted is not None and _family_of_name(wanted) != family:
        try:
            held = "{2} ({0})".format(*_detect(state, family, source))
        except InsightFaceWeightsError:
            held = "MobileFaceNet" if family == "mobilefacenet" else "IResNet"
        raise InsightFaceWeightsError(f"{source}: holds an arcface_torch {held}, not {wanted}")
    try:
        name, kwargs, their_name = _detect(state, family, source)
    except InsightFaceWeightsError as exc:
        closest = wanted or _closest(state, _embedding_size_guess(state))
        raise InsightFaceWeightsError(f"{exc}; closest supported architecture: {closest}") from None
    # "mobilefacenet" also names the family at any blocks/scale; every other name is one exact network.
    custom = "blocks" in kwargs
    if wanted is not None and wanted != name and not (wanted == "mobilefacenet" and custom):
        raise InsightFaceWeightsError(f"{source}: holds an arcface_torch {their_name} ({name}, read from its "
                                      f"keys and shapes), not {wanted}")
    first_blocks = kwargs.get("blocks", [2 if name == "mobilefacenet_large" else 1])[0]
    expected = _expected_state(name, kwargs)
    targets = {key: insightface_to_registry_key(key, family, first_blocks) for key in state}
    converted: dict[str, torch.Tensor] = {}
    unexpected, mis_shaped = [], []
    for key, value in state.items():
        target = targets[key]
        if target is None or target not in expected:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[target]):
            mis_shaped.append(f"{key} {list(value.shape)} (expected {list(expected[target])})")
        else:
            converted[target] = value
    mapped = set(targets.values())
    # Named as arcface_torch names them: that is the file the user has in front of them.
    missing = [registry_to_insightface_key(k, family) or k for k in expected if k not in mapped]
    if unexpected or mis_shaped or missing:
        problems = []
        for label, items in (("unexpected keys", unexpected), ("keys of the wrong shape", mis_shaped),
                             ("missing keys", missing)):
            if items:
                more = f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
                problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOWN])}{more}")
        closest = _closest(state, int(kwargs["embedding_size"]))
        raise InsightFaceWeightsError(f"{source}: does not load strictly as arcface_torch {their_name}: "
                                      f"{'; '.join(problems)}; closest supported architecture: {closest}")
    return InsightFaceBackbone(name, kwargs, converted, their_name, source,
                               {key: target for key, target in targets.items() if target is not None})


def load_insightface_backbone(path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                              arch: str | None = None) -> nn.Module:
    """An arcface_torch backbone (file or state dict) as a registry network in eval mode, on the CPU.

    Same outputs as arcface_torch's model in eval mode, up to float32 summation order.
    """
    if isinstance(path_or_state_dict, Mapping):
        converted = convert_insightface_state_dict(path_or_state_dict, arch)
    else:
        state, source = read_weights_file(path_or_state_dict)
        converted = convert_insightface_state_dict(state, arch, source)
    return build_converted(converted)


def build_converted(converted: InsightFaceBackbone) -> nn.Module:
    """The registry network of ``converted`` with its weights loaded (eval mode, CPU)."""
    from backbones import create_backbone

    # Built on the meta device then given storage: no random initialisation that the load would overwrite.
    with torch.device("meta"):
        model = create_backbone(converted.name, **converted.kwargs)
    model = model.to_empty(device="cpu")
    model.load_state_dict(converted.state_dict, strict=True)
    return model.eval()
