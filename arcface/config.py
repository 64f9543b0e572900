"""The typed training configuration: nested dataclasses, TOML recipes with inheritance, dotted overrides.

A recipe in ``configs/`` is a short delta from ``configs/base.toml`` (the mission's MS1MV2 LResNet100E-IR
ArcFace recipe, equal to the dataclass defaults)::

    inherit = "base.toml"
    [data]
    rec = "/data/faces_emore"
    num_classes = 85742

:func:`load_config` resolves ``inherit`` chains (paths relative to the including file), applies dotted
command-line overrides (``fc.sample_rate=0.1 eval.bins=[lfw.bin,cfp_fp.bin]``, parsed by field type) and
validates everything. Every error is a ``ValueError`` naming the dotted key. Values that depend on the
run (global batch, scaled LR, steps) are methods computed on demand and never written back, so the saved
``config.json`` is exactly what the user asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "DataConfig", "BackboneConfig", "LossConfig", "FCConfig", "OptimConfig", "ScheduleConfig",
    "RuntimeConfig", "EvalConfig", "OutputConfig", "TrainConfig", "load_config", "parse_override",
    "config_reference", "CONFIGS_DIR", "MARGIN_NAMES", "OBJECTIVE_KINDS", "TRIPLET_MINING", "HEADS",
    "SAMPLERS", "COMPILE_SCOPES",
]

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

# Presets of arcface.head.margins.build_margin. Kept here (not imported) so that validating a config does not
# need torch; tests check the two lists agree once the margins module exists.
MARGIN_NAMES = ("softmax", "normface", "sphereface", "arcface", "cosface", "am-softmax", "combined",
                "adaface", "curricularface")
# Training-data samplers (data.sampler) and what happens to identities with fewer than K images.
SAMPLERS = ("shuffle", "pk")
SMALL_IDENTITIES = ("replace", "skip")
# The training objectives of arcface.objectives (loss.kind); kept here for the same reason.
OBJECTIVE_KINDS = ("margin_softmax", "triplet", "contrastive", "lifted", "margin", "softmax+contrastive",
                   "softmax+center")
# loss.triplet_mining (arcface.objectives.pairwise.TripletObjective)
TRIPLET_MINING = ("semihard", "batch_hard", "soft_margin")
# Classifier heads of the sharded Partial FC (loss.head).
HEADS = ("cosine", "lsoftmax")
# What runtime.compile compiles (arcface.compiling; kept here for the same reason).
COMPILE_SCOPES = ("model", "blocks")
# Which of the combined-margin parameters each fixed preset allows to differ from "no margin"
# (m1 = 1 SphereFace multiplicative angular, m2 = 0 ArcFace additive angular, m3 = 0 CosFace additive
# cosine). A mismatch is an error rather than a silent override, so a recipe never says one thing and
# trains another.
_PRESET_FREE = {"softmax": (), "normface": (), "sphereface": ("m1",), "arcface": ("m2",),
                "cosface": ("m3",), "am-softmax": ("m3",)}
_NEUTRAL = {"m1": 1.0, "m2": 0.0, "m3": 0.0}


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with its user documentation attached (shown by :func:`config_reference`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{key} {message}, got {value!r}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"must be one of {', '.join(repr(c) for c in choices)}", value)


class _Section:
    """Shared helpers of the config sections (``_name`` is the section's key in ``TrainConfig``)."""

    _name: ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self._name}.{name}"


@dataclass
class DataConfig(_Section):
    """Where the images come from and how they are augmented."""

    _name: ClassVar[str] = "data"
    rec: str = _f("", "dataset: a .rec file, its prefix, a folder holding train.rec, or a shard manifest "
                      "(.json); empty with data.synthetic = true")
    num_classes: int = _f(0, "number of identities; 0 = take it from the data, otherwise it must match the "
                             "data (required for synthetic data)")
    synthetic: bool = _f(False, "train on fixed random in-memory uint8 images (speed tests; no files read)")
    synthetic_num_images: int = _f(100_000, "epoch size of the synthetic mode")
    num_workers: int = _f(4, "data-loading worker processes per rank (decoding + augmentation); 0 = inline")
    flip: bool = _f(True, "random horizontal flip (probability 0.5)")
    random_resized_crop: bool = _f(False, "random crop of crop_scale_min..1 of the area, aspect 3/4..4/3, "
                                          "resized back to 112x112")
    crop_scale_min: float = _f(0.8, "smallest area fraction kept by random_resized_crop")
    color_jitter: float = _f(0.0, "brightness/contrast/saturation jitter strength s: factors in [1-s, 1+s]")
    grayscale_prob: float = _f(0.0, "probability of converting an image to grey (3 equal channels)")
    blur_prob: float = _f(0.0, "probability of a Gaussian blur with sigma in [0.5, 2.0]")
    low_res_prob: float = _f(0.0, "probability of downscaling to low_res_min_size..56 px and back to 112")
    low_res_min_size: int = _f(16, "smallest side of the low-resolution augmentation")
    seed: int = _f(2048, "seed of the epoch shuffle and of the augmentations (same on every rank)")
    sampler: str = _f("shuffle", "'shuffle': one seeded permutation of all images per epoch; 'pk': "
                                 "identity-balanced P x K batches (P = runtime.batch_size / K identities per "
                                 "rank, disjoint across ranks; an epoch visits every identity once)")
    pk_images_per_identity: int = _f(4, "data.sampler = 'pk': K, images per identity in a batch (FaceNet: "
                                        "about 40 per identity in batches of 1800; batch-hard triplet: 4)")
    pk_small_identities: str = _f("replace", "data.sampler = 'pk': identities with fewer than K images "
                                             "are drawn with replacement ('replace') or left out ('skip'); "
                                             "their number is logged at the start")

    def __post_init__(self) -> None:
        _check(self.num_classes >= 0, self._key("num_classes"), "must be >= 0", self.num_classes)
        _check(self.synthetic_num_images > 0, self._key("synthetic_num_images"), "must be > 0",
               self.synthetic_num_images)
        _check(self.num_workers >= 0, self._key("num_workers"), "must be >= 0", self.num_workers)
        _check(0.0 < self.crop_scale_min <= 1.0, self._key("crop_scale_min"), "must be in (0, 1]",
               self.crop_scale_min)
        _check(0.0 <= self.color_jitter < 1.0, self._key("color_jitter"), "must be in [0, 1)",
               self.color_jitter)
        for name in ("grayscale_prob", "blur_prob", "low_res_prob"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, self._key(name), "must be a probability in [0, 1]", value)
        _check(4 <= self.low_res_min_size <= 56, self._key("low_res_min_size"), "must be in [4, 56]",
               self.low_res_min_size)
        _check(self.seed >= 0, self._key("seed"), "must be >= 0", self.seed)
        _choice(self._key("sampler"), self.sampler, SAMPLERS)
        _check(self.pk_images_per_identity >= 1, self._key("pk_images_per_identity"), "must be >= 1",
               self.pk_images_per_identity)
        _choice(self._key("pk_small_identities"), self.pk_small_identities, SMALL_IDENTITIES)
        if self.synthetic:
            _check(self.num_classes > 0, self._key("num_classes"), "must be > 0 when data.synthetic = true",
                   self.num_classes)


@dataclass
class BackboneConfig(_Section):
    """The embedding network (read back by ``arcface.checkpoint.load_backbone``)."""

    _name: ClassVar[str] = "backbone"
    name: str = _f("r100", "registered backbone: r18 r34 r50 r100 (LResNet100E-IR) r200 mobilefacenet (mbf) "
                           "mobilefacenet_large (mbf_large) mobilefacenet_s")
    embedding_size: int = _f(512, "embedding dimension D")
    dropout: float = _f(0.0, "dropout of the E head (BN-Dropout-FC-BN)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    width: int = _f(0, "MobileFaceNet channel multiplier (arcface_torch's `scale`); 0 = the network's own")
    blocks: list[int] = _f([], "MobileFaceNet units per stage, 4 numbers (arcface_torch's `blocks`); [] = "
                               "the network's own")
    init_from: str = _f("", "start from these backbone weights: a checkpoint of ours or an arcface_torch "
                            "backbone.pth / model.pt / checkpoint_gpu_0.pt (the FC starts fresh); empty = "
                            "random initialisation")

    def __post_init__(self) -> None:
        _check(bool(self.name), self._key("name"), "must name a backbone", self.name)
        _check(self.embedding_size > 0, self._key("embedding_size"), "must be > 0", self.embedding_size)
        _check(0.0 <= self.dropout < 1.0, self._key("dropout"), "must be in [0, 1)", self.dropout)
        _check(self.width >= 0, self._key("width"), "must be >= 0 (0 = the network's own)", self.width)
        _check(not self.blocks or (len(self.blocks) == 4 and all(b >= 1 for b in self.blocks)),
               self._key("blocks"), "must be [] or 4 unit counts >= 1", self.blocks)
        try:  # the registry needs torch; skip the check only where backbones cannot be imported at all
            from backbones import canonical_name
        except ImportError:
            return
        try:  # aliases such as "LResNet100E-IR" or "iresnet100" are resolved by the registry
            name = canonical_name(self.name)
        except ValueError as exc:
            raise ValueError(f"backbone.name: {exc}") from None
        if (self.width or self.blocks) and not name.startswith("mobilefacenet"):
            raise ValueError(f"backbone.width / backbone.blocks apply to MobileFaceNet backbones, not "
                             f"{self.name!r} (got width {self.width}, blocks {self.blocks})")


@dataclass
class LossConfig(_Section):
    """The training objective (``kind``) and its settings: the margin softmax over the sharded FC with
    its classifier head (``head = "cosine"``: logits ``scale * (cos(m1 * theta + m2) - m3)`` at the target
    class; ``"lsoftmax"``: L-Softmax on unnormalised logits, arcface.head.lsoftmax), also the identification
    part of ``softmax+contrastive`` and ``softmax+center``; the pair / triplet losses over the global batch
    and center loss (docs/losses.md)."""

    _name: ClassVar[str] = "loss"
    kind: str = _f("margin_softmax", "training objective (arcface.objectives): " + ", ".join(OBJECTIVE_KINDS))
    margin: str = _f("arcface", "preset of arcface.head.margins.build_margin: " + ", ".join(MARGIN_NAMES))
    scale: float = _f(64.0, "logit scale s")
    m1: float = _f(1.0, "SphereFace multiplicative angular margin (1 = none)")
    m2: float = _f(0.5, "ArcFace additive angular margin in radians (0 = none)")
    m3: float = _f(0.0, "CosFace additive cosine margin (0 = none)")
    gradient: str = _f("exact", "theta + m > pi fallback: 'exact' (monotone target logit, exact gradient) "
                                "or 'straight_through'")
    interclass_filtering_threshold: float = _f(0.0, "ignore negatives whose cosine exceeds this (likely "
                                                    "label noise); 0 = off")
    triplet_margin: float = _f(0.2, "triplet: margin alpha of max(d(a,p) - d(a,n) + alpha, 0) (FaceNet: 0.2 "
                                    "on squared distances of unit embeddings; unused by soft_margin)")
    triplet_mining: str = _f("semihard", "triplet: 'semihard' (FaceNet: every anchor-positive pair of the "
                                         "global batch with its closest negative farther than the positive "
                                         "but inside the margin), 'batch_hard' (TriHard: per anchor the "
                                         "farthest positive and closest negative) or 'soft_margin' "
                                         "(batch-hard with log(1 + exp(d_ap - d_an)))")
    triplet_distance: str = _f("squared", "triplet: 'squared' Euclidean (FaceNet) or 'euclidean' (Hermans "
                                          "et al.'s choice for batch-hard)")
    triplet_normalize: bool = _f(True, "triplet: L2-normalise the embeddings (FaceNet); false = raw "
                                       "embeddings, as Hermans et al. train batch-hard (which can collapse "
                                       "on the sphere from a poor start, docs/losses.md)")
    contrastive_margin: float = _f(1.0, "contrastive, softmax+contrastive: different-identity pairs closer "
                                        "than this Euclidean distance of unit embeddings (0..2) are pushed "
                                        "apart")
    joint_weight: float = _f(0.05, "softmax+contrastive: weight lambda of the verification (contrastive) "
                                   "signal next to the identification softmax (DeepID2: 0.05)")
    lifted_margin: float = _f(1.0, "lifted: margin alpha of the lifted structured loss on raw embeddings "
                                   "(Song et al.: 1.0)")
    margin_alpha: float = _f(0.2, "margin: alpha, the margin on each side of the boundary beta (Wu et al.: "
                                  "0.2)")
    margin_beta_init: float = _f(1.2, "margin: initial value of the learnable boundary beta between "
                                      "positive and negative distances of unit embeddings (Wu et al.: 1.2)")
    margin_beta_lr: float = _f(0.1, "margin: learning rate of beta (SGD with optim.momentum) at the "
                                    "schedule's peak, following its warmup and decay; 0 = beta fixed "
                                    "(Wu et al.'s code: 0.1)")
    margin_nu: float = _f(0.0, "margin: weight nu of the regulariser nu * beta (Wu et al.'s code: 0)")
    head: str = _f("cosine", "classifier logits: 'cosine' (normalised embeddings and FC rows; loss.margin, "
                             "loss.scale) or 'lsoftmax' (L-Softmax: unnormalised W x with the margin "
                             "loss.lsoftmax_margin on the target; loss.margin and loss.scale are not used)")
    lsoftmax_margin: int = _f(4, "L-Softmax integer multiplicative angular margin m: target |W||x| "
                                 "psi(theta), psi = (-1)^k cos(m theta) - 2k; 1 = plain softmax W x "
                                 "(the paper trains m = 2, 3, 4)")
    lsoftmax_lambda_base: float = _f(1000.0, "L-Softmax blend weight lambda = max(base * (1 + gamma * t) "
                                             "** -power, lambda_min), t = training forwards: base (the "
                                             "authors' code: 1000)")
    lsoftmax_lambda_gamma: float = _f(0.12, "L-Softmax lambda annealing gamma (the authors' face recipe "
                                            "0.12; their MNIST example 2.5e-5)")
    lsoftmax_lambda_power: float = _f(1.0, "L-Softmax lambda annealing power (face recipe 1; MNIST 35)")
    lsoftmax_lambda_min: float = _f(5.0, "L-Softmax smallest lambda (face recipe 5; MNIST 0 = the full "
                                         "margin in the end)")
    center_weight: float = _f(0.003, "loss.kind = 'softmax+center': lambda, weight of the center term "
                                     "0.5 * mean ||x_i - c_y||^2 (paper: 0.003 for faces)")
    center_lr: float = _f(0.5, "loss.kind = 'softmax+center': alpha, the centre learning rate of the "
                               "paper's update c_j -= alpha * sum_i (c_j - x_i) / (1 + n_j) (paper: 0.5)")
    center_normalize: bool = _f(False, "loss.kind = 'softmax+center': center term on L2-normalised "
                                       "embeddings (for cosine heads, whose softmax ignores the norm); "
                                       "paper: false, raw features")

    def __post_init__(self) -> None:
        _choice(self._key("kind"), self.kind, OBJECTIVE_KINDS)
        _choice(self._key("margin"), self.margin, MARGIN_NAMES)
        _check(self.scale > 0, self._key("scale"), "must be > 0", self.scale)
        _check(self.m1 >= 1.0, self._key("m1"), "(SphereFace multiplicative margin) must be >= 1", self.m1)
        _check(0.0 <= self.m2 < math.pi / 2, self._key("m2"), "(ArcFace angular margin) must be in [0, pi/2)",
               self.m2)
        _check(0.0 <= self.m3 < 1.0, self._key("m3"), "(CosFace cosine margin) must be in [0, 1)", self.m3)
        _choice(self._key("gradient"), self.gradient, ("exact", "straight_through"))
        _check(self.triplet_margin > 0, self._key("triplet_margin"), "must be > 0", self.triplet_margin)
        _choice(self._key("triplet_mining"), self.triplet_mining, TRIPLET_MINING)
        _choice(self._key("triplet_distance"), self.triplet_distance, ("squared", "euclidean"))
        _check(self.contrastive_margin > 0, self._key("contrastive_margin"), "must be > 0",
               self.contrastive_margin)
        _check(self.joint_weight > 0, self._key("joint_weight"),
               "must be > 0 (loss.kind = 'margin_softmax' is the softmax alone)", self.joint_weight)
        _check(self.lifted_margin > 0, self._key("lifted_margin"), "must be > 0", self.lifted_margin)
        _check(self.margin_alpha > 0, self._key("margin_alpha"), "must be > 0", self.margin_alpha)
        _check(0.0 < self.margin_beta_init < 2.0, self._key("margin_beta_init"),
               "must be in (0, 2) (a distance between unit vectors)", self.margin_beta_init)
        _check(self.margin_beta_lr >= 0, self._key("margin_beta_lr"), "must be >= 0 (0 = fixed beta)",
               self.margin_beta_lr)
        _check(self.margin_nu >= 0, self._key("margin_nu"), "must be >= 0", self.margin_nu)
        _check(0.0 <= self.interclass_filtering_threshold < 1.0, self._key("interclass_filtering_threshold"),
               "must be in [0, 1)", self.interclass_filtering_threshold)
        _choice(self._key("head"), self.head, HEADS)
        _check(self.lsoftmax_margin >= 1, self._key("lsoftmax_margin"), "must be an integer >= 1",
               self.lsoftmax_margin)
        for name in ("lsoftmax_lambda_base", "lsoftmax_lambda_gamma", "lsoftmax_lambda_power",
                     "lsoftmax_lambda_min"):
            value = getattr(self, name)
            _check(value >= 0 and math.isfinite(value), self._key(name), "must be a finite number >= 0",
                   value)
        if self.head == "lsoftmax":
            _check(self.interclass_filtering_threshold == 0.0, self._key("interclass_filtering_threshold"),
                   "must be 0 with loss.head = 'lsoftmax' (it filters cosines; L-Softmax logits are "
                   "unnormalised)", self.interclass_filtering_threshold)
            _check(self.margin not in ("adaface", "curricularface"), self._key("margin"),
                   "cannot be a stateful cosine margin with loss.head = 'lsoftmax' (the margin is "
                   "loss.lsoftmax_margin)", self.margin)
        _check(self.center_weight >= 0 and math.isfinite(self.center_weight), self._key("center_weight"),
               "must be a finite number >= 0", self.center_weight)
        _check(0.0 < self.center_lr <= 1.0, self._key("center_lr"), "must be in (0, 1]", self.center_lr)
        free = _PRESET_FREE.get(self.margin)
        if free is not None:
            for name, neutral in _NEUTRAL.items():
                if name not in free and getattr(self, name) != neutral:
                    hint = {"arcface": "set loss.m2", "cosface": "set loss.m2 = 0.0 and loss.m3",
                            "am-softmax": "set loss.m2 = 0.0 and loss.m3",
                            "sphereface": "set loss.m2 = 0.0 and loss.m1"}.get(self.margin, "leave them")
                    raise ValueError(f"{self._key(name)} must be {neutral} with loss.margin = "
                                     f"{self.margin!r} (got {getattr(self, name)!r}); {hint}, or use "
                                     "loss.margin = 'combined'")

    def lsoftmax_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``arcface.head.lsoftmax.LSoftmaxHead(**kwargs)``."""
        return {"margin": self.lsoftmax_margin, "lambda_base": self.lsoftmax_lambda_base,
                "lambda_gamma": self.lsoftmax_lambda_gamma, "lambda_power": self.lsoftmax_lambda_power,
                "lambda_min": self.lsoftmax_lambda_min}

    def margin_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``arcface.head.margins.build_margin(self.margin, **kwargs)``."""
        if self.margin in ("adaface", "curricularface"):
            return {"scale": self.scale}  # their own margin parameters come from the preset
        return {"scale": self.scale, "m1": self.m1, "m2": self.m2, "m3": self.m3, "gradient": self.gradient,
                "interclass_filtering_threshold": self.interclass_filtering_threshold}


@dataclass
class FCConfig(_Section):
    """The sharded Partial FC classifier."""

    _name: ClassVar[str] = "fc"
    sample_rate: float = _f(1.0, "fraction of each shard's classes used per step (positives always kept); "
                                 "1 = plain model parallelism")
    update: str = _f("sparse", "'sparse': only sampled rows and their optimiser state change; 'dense': "
                               "every row gets weight decay and momentum each step")
    optimizer: str = _f("same", "'sgd', 'adamw', or 'same' (= optim.name)")
    lr_scale: float = _f(1.0, "FC learning rate = backbone learning rate * lr_scale")

    def __post_init__(self) -> None:
        _check(0.0 < self.sample_rate <= 1.0, self._key("sample_rate"), "must be in (0, 1]", self.sample_rate)
        _choice(self._key("update"), self.update, ("sparse", "dense"))
        _choice(self._key("optimizer"), self.optimizer, ("sgd", "adamw", "same"))
        _check(self.lr_scale > 0, self._key("lr_scale"), "must be > 0", self.lr_scale)


@dataclass
class OptimConfig(_Section):
    """Backbone optimiser (and FC optimiser with fc.optimizer = 'same')."""

    _name: ClassVar[str] = "optim"
    name: str = _f("sgd", "'sgd' (momentum) or 'adamw'")
    lr: float = _f(0.1, "learning rate at optim.base_batch_size; scaled linearly with the global batch")
    base_batch_size: int = _f(512, "global batch size optim.lr refers to")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay (decoupled for AdamW)")
    no_decay_bn_bias_prelu: bool = _f(False, "exclude BatchNorm, bias and PReLU parameters from weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(5.0, "clip the backbone gradient norm to this; 0 = off")
    accumulation_steps: int = _f(1, "micro-batches per optimiser update (loss scaled by 1/steps)")

    def __post_init__(self) -> None:
        _choice(self._key("name"), self.name, ("sgd", "adamw"))
        _check(self.lr > 0, self._key("lr"), "must be > 0", self.lr)
        _check(self.base_batch_size > 0, self._key("base_batch_size"), "must be > 0", self.base_batch_size)
        _check(0.0 <= self.momentum < 1.0, self._key("momentum"), "must be in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, self._key("weight_decay"), "must be >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), self._key("betas"),
               "must be two numbers in [0, 1)", self.betas)
        _check(self.eps > 0, self._key("eps"), "must be > 0", self.eps)
        _check(self.grad_clip >= 0, self._key("grad_clip"), "must be >= 0 (0 = off)", self.grad_clip)
        _check(self.accumulation_steps >= 1, self._key("accumulation_steps"), "must be >= 1",
               self.accumulation_steps)


@dataclass
class ScheduleConfig(_Section):
    """Learning-rate schedule: linear warmup, then polynomial / cosine / step decay (per optimiser update)."""

    _name: ClassVar[str] = "schedule"
    name: str = _f("polynomial", "'polynomial', 'cosine' or 'step'")
    epochs: int = _f(20, "training length in epochs (used when schedule.total_steps = 0)")
    total_steps: int = _f(0, "training length in optimiser updates; 0 = epochs * steps per epoch")
    warmup_epochs: float = _f(0.0, "linear warmup length in epochs (fractions allowed)")
    warmup_steps: int = _f(0, "linear warmup length in optimiser updates (instead of warmup_epochs)")
    power: float = _f(2.0, "exponent of the polynomial decay")
    milestones: list[int] = _f([], "epochs at which the step schedule multiplies the LR by gamma")
    gamma: float = _f(0.1, "step-schedule factor")
    min_lr: float = _f(0.0, "LR reached at the end (polynomial, cosine) and floor of the step schedule")

    def __post_init__(self) -> None:
        _choice(self._key("name"), self.name, ("polynomial", "cosine", "step"))
        _check(self.epochs >= 1, self._key("epochs"), "must be >= 1", self.epochs)
        _check(self.total_steps >= 0, self._key("total_steps"), "must be >= 0 (0 = from epochs)",
               self.total_steps)
        _check(self.warmup_epochs >= 0, self._key("warmup_epochs"), "must be >= 0", self.warmup_epochs)
        _check(self.warmup_steps >= 0, self._key("warmup_steps"), "must be >= 0", self.warmup_steps)
        if self.warmup_epochs > 0 and self.warmup_steps > 0:
            raise ValueError("schedule.warmup_steps and schedule.warmup_epochs are both set "
                             f"({self.warmup_steps}, {self.warmup_epochs}); set only one")
        if self.total_steps == 0:
            _check(self.warmup_epochs < self.epochs, self._key("warmup_epochs"),
                   f"must be < schedule.epochs = {self.epochs}", self.warmup_epochs)
        else:
            _check(self.warmup_steps < self.total_steps, self._key("warmup_steps"),
                   f"must be < schedule.total_steps = {self.total_steps}", self.warmup_steps)
        _check(self.power > 0, self._key("power"), "must be > 0", self.power)
        _check(0.0 < self.gamma <= 1.0, self._key("gamma"), "must be in (0, 1]", self.gamma)
        _check(self.min_lr >= 0, self._key("min_lr"), "must be >= 0", self.min_lr)
        _check(all(m >= 1 for m in self.milestones) and
               all(a < b for a, b in zip(self.milestones, self.milestones[1:])),
               self._key("milestones"), "must be strictly increasing epochs >= 1", self.milestones)
        if self.name == "step":
            _check(bool(self.milestones), self._key("milestones"), "must not be empty with schedule.name = "
                   "'step'", self.milestones)
            if self.total_steps == 0:
                _check(self.milestones[-1] < self.epochs, self._key("milestones"),
                       f"must be < schedule.epochs = {self.epochs}", self.milestones)


@dataclass
class RuntimeConfig(_Section):
    """Per-process execution settings."""

    _name: ClassVar[str] = "runtime"
    batch_size: int = _f(128, "micro-batch size per rank")
    amp: str = _f("none", "backbone autocast: 'none', 'fp16' (with a grad scaler) or 'bf16'")
    fp16_init_scale: float = _f(65536.0, "fp16: the grad scaler's first loss scale; while gradients overflow "
                                         "the update is skipped and the scale halves")
    compile: bool = _f(False, "torch.compile the backbone")
    compile_backend: str = _f("inductor", "torch.compile backend: 'inductor' (generated kernels; needs a C++ "
                              "compiler on CPU), 'aot_eager' (graph capture only, quick to start) or 'eager'")
    compile_scope: str = _f("blocks", "what runtime.compile compiles: 'blocks' (each repeated residual unit "
                            "in place; units of one shape share a graph, so r100 compiles 8 small graphs) or "
                            "'model' (the whole backbone as one graph). The default 'blocks' compiled r100 "
                            "(inductor, CPU) in 0.47-0.66x the time of 'model' at the same step time within "
                            "noise (0.95-1.10x; docs/gpu.md). 'blocks' cannot be combined with "
                            "backbone.gradient_checkpointing")
    channels_last: bool = _f(False, "channels_last memory format for the backbone")
    seed: int = _f(2048, "seed of model initialisation and of the Partial FC negative sampling")
    device: str = _f("auto", "'auto' (CUDA local rank if available), 'cpu' or 'cuda'")
    max_nonfinite_steps: int = _f(10, "stop after this many non-finite losses in a row (each is skipped)")
    log_every: int = _f(50, "log a line every N optimiser updates")
    deterministic: bool = _f(False, "deterministic kernels (slower; bit-reproducible runs)")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, self._key("batch_size"), "must be >= 1", self.batch_size)
        _choice(self._key("amp"), self.amp, ("none", "fp16", "bf16"))
        _check(self.fp16_init_scale > 0 and math.isfinite(self.fp16_init_scale), self._key("fp16_init_scale"),
               "must be a positive finite number", self.fp16_init_scale)
        _choice(self._key("compile_backend"), self.compile_backend, ("inductor", "aot_eager", "eager"))
        _choice(self._key("compile_scope"), self.compile_scope, COMPILE_SCOPES)
        _check(self.seed >= 0, self._key("seed"), "must be >= 0", self.seed)
        _choice(self._key("device"), self.device, ("auto", "cpu", "cuda"))
        _check(self.max_nonfinite_steps >= 1, self._key("max_nonfinite_steps"), "must be >= 1",
               self.max_nonfinite_steps)
        _check(self.log_every >= 1, self._key("log_every"), "must be >= 1", self.log_every)


@dataclass
class EvalConfig(_Section):
    """Verification on .bin packs during training."""

    _name: ClassVar[str] = "eval"
    bins: list[str] = _f([], "paths of verification packs (.bin: lfw, cfp_fp, agedb_30, ...)")
    every: int = _f(2000, "verify every N optimiser updates; 0 = off")
    batch_size: int = _f(64, "embedding batch size")
    distributed: bool = _f(False, "spread the embedding of each pack over all ranks")

    def __post_init__(self) -> None:
        _check(all(isinstance(b, str) and b for b in self.bins), self._key("bins"),
               "must be a list of non-empty paths", self.bins)
        _check(self.every >= 0, self._key("every"), "must be >= 0 (0 = off)", self.every)
        _check(self.batch_size >= 1, self._key("batch_size"), "must be >= 1", self.batch_size)


@dataclass
class OutputConfig(_Section):
    """Where the run writes and how it resumes."""

    _name: ClassVar[str] = "output"
    dir: str = _f("outputs/run", "output folder: config.json, log, TensorBoard events, checkpoints/")
    checkpoint_every: int = _f(2000, "checkpoint every N optimiser updates (also at the end and on "
                                     "SIGTERM/SIGINT); 0 = only then")
    keep_last: int = _f(3, "number of periodic checkpoints kept")
    resume: str = _f("auto", "'auto' (latest complete checkpoint in output.dir, if any), 'none', or a "
                             "checkpoint path")
    tensorboard: bool = _f(True, "write TensorBoard scalars")
    resume_from_insightface: str = _f("", "continue an arcface_torch run: its folder of checkpoint_gpu_*.pt "
                                          "(any world size), imported once into output.dir/checkpoints, "
                                          "from where later restarts resume; needs output.resume = 'auto'")

    def __post_init__(self) -> None:
        _check(bool(self.dir), self._key("dir"), "must not be empty", self.dir)
        _check(self.checkpoint_every >= 0, self._key("checkpoint_every"), "must be >= 0",
               self.checkpoint_every)
        _check(self.keep_last >= 1, self._key("keep_last"), "must be >= 1", self.keep_last)
        _check(bool(self.resume), self._key("resume"), "must be 'auto', 'none' or a path", self.resume)
        if self.resume_from_insightface:
            _check(self.resume == "auto", self._key("resume"), "must be 'auto' with "
                   "output.resume_from_insightface (the imported run becomes this run's first checkpoint)",
                   self.resume)


_SECTIONS: dict[str, type] = {cls._name: cls for cls in (
    DataConfig, BackboneConfig, LossConfig, FCConfig, OptimConfig, ScheduleConfig, RuntimeConfig,
    EvalConfig, OutputConfig)}


@dataclass
class TrainConfig:
    """The whole training run. Build with :func:`load_config` or :meth:`from_dict`."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fc: FCConfig = field(default_factory=FCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        # Cross-section checks; each section has validated itself already.
        if self.backbone.init_from and self.output.resume_from_insightface:
            raise ValueError("backbone.init_from and output.resume_from_insightface are both set: start from "
                             "pretrained weights with a new FC, or continue a run, not both")
        if self.data.sampler == "pk" and self.runtime.batch_size % self.data.pk_images_per_identity != 0:
            raise ValueError(f"runtime.batch_size ({self.runtime.batch_size}) must be a multiple of "
                             f"data.pk_images_per_identity ({self.data.pk_images_per_identity}) with "
                             "data.sampler = 'pk' (P = batch_size / K identities per rank)")
        if self.fc.sample_rate < 1.0 and self.loss.margin in ("adaface", "curricularface"):
            # Their batch statistics are reduced over the classes a rank sees; sampling would bias them.
            raise ValueError(f"fc.sample_rate must be 1.0 with loss.margin = {self.loss.margin!r} (its batch "
                             f"statistics need every class), got {self.fc.sample_rate}")
        regional = self.runtime.compile and self.runtime.compile_scope == "blocks"
        if regional and self.backbone.gradient_checkpointing:
            # Checkpointing recomputes a stage eagerly around the compiled units, with BN running-stat
            # updates frozen: the recompute changes a guarded attribute (BN momentum), selects another
            # graph and no longer saves the tensors the first forward saved. The whole-model graph plans
            # the recompute itself.
            raise ValueError("runtime.compile_scope = 'blocks' cannot be combined with "
                             "backbone.gradient_checkpointing = true; use runtime.compile_scope = 'model'")

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able nested dict (tuples become lists); :meth:`from_dict` inverts it."""
        out: dict[str, dict[str, Any]] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a (possibly partial) nested dict; missing keys take their defaults.

        Unknown sections or keys and values of the wrong type raise ``ValueError`` naming the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a config must be a table/object of sections, got {type(d).__name__}")
        sections: dict[str, Any] = {}
        for name, values in d.items():
            if name not in _SECTIONS:
                raise ValueError(f"{source}: unknown config section {name!r}{_suggest(name, _SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"{source}: config section {name!r} must be a table, got {values!r}")
            section_cls = _SECTIONS[name]
            types = _field_types(section_cls)
            kwargs = {}
            for key, value in values.items():
                if key not in types:
                    raise ValueError(f"{source}: unknown config key '{name}.{key}'{_suggest(key, types)}")
                kwargs[key] = _coerce(value, types[key], f"{name}.{key}", source)
            sections[name] = section_cls(**kwargs)
        return cls(**sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def changes(self, base: TrainConfig | None = None) -> dict[str, Any]:
        """``{"section.key": value}`` of every key whose value differs from ``base`` (default: the
        defaults, i.e. ``configs/base.toml``), in declaration order: what a recipe and its overrides set."""
        reference = base.to_dict() if base is not None else _default_dict()
        return {f"{section}.{key}": value for section, values in self.to_dict().items()
                for key, value in values.items() if reference[section][key] != value}

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config atomically (``config.json`` of a run)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    def replace(self, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
        """A new config with dotted overrides applied (``["fc.sample_rate=0.1", ...]``)."""
        d = self.to_dict()
        for item in overrides:
            key, value = parse_override(item)
            d[key[0]][key[1]] = value
        return TrainConfig.from_dict(d, source="overrides")

    # -- derived values (computed, never written back) -------------------------------------------
    def global_batch_size(self, world_size: int) -> int:
        """Samples per optimiser update over all ranks: batch_size * world_size * accumulation_steps."""
        _positive_world(world_size)
        return self.runtime.batch_size * world_size * self.optim.accumulation_steps

    def scaled_lr(self, world_size: int) -> float:
        """Backbone base LR for this global batch: ``optim.lr * global_batch / optim.base_batch_size``."""
        return self.optim.lr * self.global_batch_size(world_size) / self.optim.base_batch_size

    def fc_optimizer_name(self) -> str:
        """The FC optimiser, resolving ``fc.optimizer = 'same'``."""
        return self.optim.name if self.fc.optimizer == "same" else self.fc.optimizer

    def steps_per_epoch(self, num_images: int, world_size: int) -> int:
        """Optimiser updates per epoch (the incomplete last global batch is dropped)."""
        steps = num_images // self.global_batch_size(world_size)
        if steps < 1:
            raise ValueError(f"runtime.batch_size = {self.runtime.batch_size} x world size {world_size} x "
                             f"optim.accumulation_steps = {self.optim.accumulation_steps} is more than the "
                             f"{num_images} images of the dataset: not one update per epoch")
        return steps

    def total_steps(self, num_images: int, world_size: int) -> int:
        """Training length in optimiser updates: ``schedule.total_steps`` or epochs * steps per epoch."""
        if self.schedule.total_steps > 0:
            return self.schedule.total_steps
        return self.schedule.epochs * self.steps_per_epoch(num_images, world_size)

    def warmup_steps(self, num_images: int, world_size: int) -> int:
        """Warmup length in optimiser updates."""
        if self.schedule.warmup_steps > 0:
            return self.schedule.warmup_steps
        return int(round(self.schedule.warmup_epochs * self.steps_per_epoch(num_images, world_size)))

    def milestone_steps(self, num_images: int, world_size: int) -> list[int]:
        """Step-schedule milestones converted from epochs to optimiser updates."""
        per_epoch = self.steps_per_epoch(num_images, world_size)
        return [m * per_epoch for m in self.schedule.milestones]


# -- loading -------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str] | None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a recipe (TOML with ``inherit``, or a saved ``config.json``), apply dotted overrides, validate.

    ``path`` may also be a bare recipe name (``"ms1mv2_r100"``) found in the project's ``configs/``;
    ``None`` means the defaults (= ``configs/base.toml``).
    """
    merged: dict[str, Any] = {} if path is None else _read_recipe(_resolve_recipe(path), ())
    for item in overrides:
        (section, key), value = parse_override(item)
        merged.setdefault(section, {})[key] = value
    source = "defaults" if path is None else str(path)
    if overrides:
        source += " + overrides"
    return TrainConfig.from_dict(merged, source=source)


def _resolve_recipe(path: str | os.PathLike[str]) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.suffix and candidate.parent == Path("."):
        named = CONFIGS_DIR / f"{candidate.name}.toml"
        if named.is_file():
            return named
    raise ValueError(f"{path}: config file not found (give a .toml/.json path or a recipe name from "
                     f"{CONFIGS_DIR}: {', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.toml')))})")


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ValueError(f"{path}: inherit cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read config ({exc.strerror})") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a table/object of sections")
    parent = raw.pop("inherit", None)
    base: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ValueError(f"{path}: 'inherit' must be a path string, got {parent!r}")
        parent_path = (path.parent / parent)
        if not parent_path.is_file():
            raise ValueError(f"{path}: inherit = {parent!r}: no such file {parent_path}")
        base = _read_recipe(parent_path, (*chain, path))
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top-level key {section!r} must be a [section] table (or 'inherit')")
        _check_keys(section, values, str(path))
        base.setdefault(section, {}).update(values)
    return base


def _check_keys(section: str, values: dict[str, Any], source: str) -> None:
    """Names and types of one file's section (cross-field validation runs on the merged config)."""
    if section not in _SECTIONS:
        raise ValueError(f"{source}: unknown config section {section!r}{_suggest(section, _SECTIONS)}")
    types = _field_types(_SECTIONS[section])
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"{source}: unknown config key '{section}.{key}'{_suggest(key, types)}")
        _coerce(value, types[key], f"{section}.{key}", source)


def parse_override(item: str) -> tuple[tuple[str, str], Any]:
    """``"fc.sample_rate=0.1"`` -> ``(("fc", "sample_rate"), 0.1)``, the value parsed by the field's type."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override {item!r}: key must be section.key (e.g. fc.sample_rate), got {dotted!r}")
    section, key = parts
    if section not in _SECTIONS:
        raise ValueError(f"override {item!r}: unknown config section {section!r}"
                         f"{_suggest(section, _SECTIONS)}")
    types = _field_types(_SECTIONS[section])
    if key not in types:
        raise ValueError(f"override {item!r}: unknown config key '{dotted}'{_suggest(key, types)}")
    return (section, key), _parse_text(text.strip(), types[key], dotted)


# -- typing helpers ------------------------------------------------------------------------------------

def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check a value from TOML/JSON against the field type (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    where = f"{source}: {key}"
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ValueError(f"{where} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # an invariant of this module


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line value by field type: bools, numbers, strings, ``[a,b]`` lists, ``(x,y)``."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = text.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[tp]
        raise ValueError(f"override {key}={text!r}: {key} must be {kind}") from None
    if tp is str:
        return _unquote(text)
    if origin in (list, tuple):
        inner = text.strip()
        if inner[:1] in "[(" and inner[-1:] in "])":
            inner = inner[1:-1]
        items = [_unquote(p.strip()) for p in inner.split(",")] if inner.strip() else []
        args = typing.get_args(tp)
        if origin is tuple and len(items) != len(args):
            raise ValueError(f"override {key}={text!r}: {key} must have {len(args)} comma-separated items")
        item_types = args if origin is tuple else [args[0]] * len(items)
        values = [_parse_text(p, a, key) for p, a in zip(items, item_types)]
        return tuple(values) if origin is tuple else values
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _positive_world(world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")


def _default_dict() -> dict[str, dict[str, Any]]:
    """Every section's defaults, without the cross-section checks of a whole config."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in _SECTIONS.items():
        out[name] = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[name][f.name] = _plain(default)
    return out


def config_reference() -> str:
    """A Markdown table of every key, its default and its documentation (for docs/configuration.md)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    defaults = _default_dict()
    for name, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            lines.append(f"| `{name}.{f.name}` | `{json.dumps(defaults[name][f.name])}` | {doc} |")
    return "\n".join(lines)
