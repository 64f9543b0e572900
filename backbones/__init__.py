"""Single-device face-recognition backbones behind one registry.

    >>> from backbones import create_backbone, list_backbones
    >>> model = create_backbone("r100", embedding_size=512)   # LResNet100E-IR

Every backbone takes NCHW float32 RGB input normalised as ``(pixel - 127.5) / 127.5`` (see
``arcface.preprocess``), 112x112, and returns the raw (unnormalised) embedding ``[batch, D]``.
Common options: ``embedding_size``, ``dropout`` (before the embedding FC), ``gradient_checkpointing``.
Backbones never touch devices, autocast or process groups: the trainer applies those from outside.
Each class names its repeated unit in ``repeated_blocks`` (metadata: the trainer's regional
``torch.compile`` compiles those units one by one, see ``arcface.compiling``).

Weights trained by InsightFace ``arcface_torch`` load with :func:`load_insightface_backbone` (key
mapping and architecture detection in :mod:`backbones.insightface`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from backbones.iresnet import LAYOUTS, IResNet
from backbones.mobilefacenet import INSIGHTFACE_HIDDEN, MobileFaceNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a backbone factory under ``name`` (and aliases) to the registry."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = factory
        for alias in aliases:
            _ALIASES[alias.lower()] = name
        return factory

    return wrap


def _iresnet_factory(layout: str) -> Callable[..., nn.Module]:
    def build(**kwargs: object) -> nn.Module:
        return IResNet(LAYOUTS[layout], **kwargs)  # type: ignore[arg-type]

    build.__doc__ = f"IResNet-{layout[1:]} with blocks {LAYOUTS[layout]}."
    return build


for _layout in LAYOUTS:
    _aliases = [f"iresnet{_layout[1:]}"] + (["LResNet100E-IR"] if _layout == "r100" else [])
    register(_layout, *_aliases)(_iresnet_factory(_layout))


@register("mobilefacenet", "mbf")
def mobilefacenet(**kwargs: object) -> nn.Module:
    """MobileFaceNet as arcface_torch's ``mbf`` (2.06 M parameters at 512-d; ``width`` = its ``scale``,
    ``blocks`` = its ``blocks``; the expanded widths stay arcface_torch's at any width)."""
    kwargs.setdefault("hidden", INSIGHTFACE_HIDDEN)
    return MobileFaceNet(**kwargs)  # type: ignore[arg-type]


@register("mobilefacenet_large", "mbf_large")
def mobilefacenet_large(**kwargs: object) -> nn.Module:
    """arcface_torch's ``mbf_large``: MobileFaceNet at width 4 with blocks (2, 8, 12, 4)."""
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    kwargs.setdefault("width", 4)
    return mobilefacenet(**kwargs)


@register("mobilefacenet_s", "mbf_s")
def mobilefacenet_small(**kwargs: object) -> nn.Module:
    """MobileFaceNet at half width (0.5 M parameters at 128-d): for CPU demos and quick experiments."""
    return MobileFaceNet(width=1, **kwargs)  # type: ignore[arg-type]


def canonical_name(name: str) -> str:
    """Registry name for ``name`` or one of its aliases (case-insensitive)."""
    if name in _REGISTRY:
        return name
    key = name.lower()
    if key in _REGISTRY:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    known = ", ".join(list_backbones())
    raise ValueError(f"unknown backbone {name!r}; known backbones: {known} "
                     f"(aliases: {', '.join(sorted(_ALIASES))})")


def list_backbones() -> list[str]:
    """Registered backbone names (aliases excluded)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, *, embedding_size: int = 512, dropout: float = 0.0,
                    gradient_checkpointing: bool = False, **kwargs: object) -> nn.Module:
    """Build a registered backbone by name or alias."""
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    factory = _REGISTRY[canonical_name(name)]
    return factory(embedding_size=embedding_size, dropout=dropout,
                   gradient_checkpointing=gradient_checkpointing, **kwargs)


# After the registry: the loader builds registry networks.
from backbones.insightface import load_insightface_backbone  # noqa: E402

__all__ = ["create_backbone", "list_backbones", "canonical_name", "register", "IResNet", "MobileFaceNet",
           "load_insightface_backbone"]
