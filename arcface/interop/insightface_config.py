"""Translate an InsightFace ``arcface_torch`` config file into a TOML recipe of this trainer.

    arcface-train --from-insightface-config configs/ms1mv3_r50.py > configs/ms1mv3_r50_from_insightface.toml

An arcface_torch config is a Python file of ``config.key = value`` lines (an ``EasyDict``), applied over
``configs/base.py``. It is read with :mod:`ast` and never executed: only literal values (numbers,
strings, booleans, ``None``, tuples and lists of them, arithmetic on numbers, and earlier ``config.x``
values) are taken; any other statement is listed as not translated, as is every key this translator does
not know. Where the two trainers differ by design the recipe says so in a comment next to the key:

* the learning rate: arcface_torch uses ``config.lr`` as is for its global batch (``batch_size`` x GPUs);
  here ``optim.lr`` is scaled by ``global batch / optim.base_batch_size``, so the recipe sets
  ``optim.base_batch_size`` to ``batch_size`` x the GPU count given with ``--insightface-gpus`` (8 by
  default: arcface_torch's reference runs) and the run reproduces the original LR on that many GPUs;
* the schedule: train_v2.py's ``PolynomialLRWarmup`` is linear warmup then polynomial decay of power 1,
  ``schedule.power = 1.0`` here (our default is 2);
* the Partial FC update: arcface_torch's SGD updates every row of the FC each step (weight decay and
  momentum included), which is ``fc.update = "dense"`` here;
* the margin: ``CombinedMarginLoss(64, *margin_list)`` edits the target logit under ``no_grad``
  (gradient as if there were no margin): ``loss.gradient = "straight_through"``, ``loss.scale = 64``;
* SGD momentum: train_v2.py passes ``momentum=0.9`` whatever ``config.momentum`` says; so does the recipe.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["InsightFaceConfigError", "Translation", "INSIGHTFACE_BASE_DEFAULTS", "read_insightface_config",
           "translate_insightface_config", "main"]

# arcface_torch's configs/base.py (the values every job config starts from), used when no base.py sits
# next to the translated file.
INSIGHTFACE_BASE_DEFAULTS: dict[str, Any] = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": "ms1mv3_arcface_r50", "embedding_size": 512, "sample_rate": 1,
    "interclass_filtering_threshold": 0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "dali": False, "gradient_acc": 1, "seed": 2048, "num_workers": 2,
}
_NETWORKS = {"r18": "r18", "r34": "r34", "r50": "r50", "r100": "r100", "r200": "r200",
             "mbf": "mobilefacenet", "mbf_large": "mobilefacenet_large"}
_TRAIN_V2_MOMENTUM = 0.9
_MARGIN_SCALE = 64.0
# Keys with no counterpart here, and why (their values are not echoed: wandb_key is a secret).
_NOT_APPLICABLE = {
    "dali": "DALI loading: this trainer has its own RecordIO loader",
    "dali_aug": "DALI augmentation: see data.* for this trainer's augmentations",
    "save_all_states": "checkpoints here always hold the full training state",
    "resume": "to continue an arcface_torch run use output.resume_from_insightface=<its output folder>",
    "using_wandb": "Weights & Biases logging: this trainer writes TensorBoard (output.tensorboard)",
    "wandb_key": "Weights & Biases", "wandb_entity": "Weights & Biases", "wandb_project": "Weights & Biases",
    "wandb_log_all": "Weights & Biases", "wandb_resume": "Weights & Biases",
    "suffix_run_name": "Weights & Biases",
    "notes": "Weights & Biases", "save_artifacts": "Weights & Biases",
    "num_image": "the image count is read from the data here",
}
_SECRET = ("wandb_key",)


class InsightFaceConfigError(ValueError):
    """The file cannot be read or names something that has no equivalent here (the message says what)."""


@dataclass
class Translation:
    """A translated recipe: ``toml`` (the recipe text), ``values`` (``{section: {key: value}}``) and the
    arcface_torch keys that were not translated, with the reason."""

    source: Path
    values: dict[str, dict[str, Any]]
    comments: dict[tuple[str, str], str]
    untranslated: list[str] = field(default_factory=list)
    base: str = ""

    @property
    def toml(self) -> str:
        lines = [f"# Translated from the arcface_torch config {self.source} ({self.base})",
                 "# by `arcface-train --from-insightface-config`; see docs/migrating_from_insightface.md.",
                 "# Keys not set here take this trainer's defaults (configs/base.toml)."]
        if self.untranslated:
            lines.append("#")
            lines.append("# Not translated:")
            lines += [f"#   {item}" for item in self.untranslated]
        for section, values in self.values.items():
            lines += ["", f"[{section}]"]
            for key, value in values.items():
                text = f"{key} = {_toml_value(value)}"
                comment = self.comments.get((section, key))
                lines.append(f"{text:<40} # {comment}" if comment else text)
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# -- reading without executing ----------------------------------------------------------------------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}


class _NotLiteral(Exception):
    pass


def _evaluate(node: ast.AST, known: dict[str, Any]) -> Any:
    """The value of a literal expression; raises _NotLiteral for anything that would need execution."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str | bool | type(None)):
        return node.value
    if isinstance(node, ast.Tuple | ast.List):
        items = [_evaluate(item, known) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand, known)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _NotLiteral
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, known), _evaluate(node.right, known)
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (left, right)):
            raise _NotLiteral
        try:
            value = _BINARY[type(node.op)](left, right)
        except ArithmeticError:
            raise _NotLiteral from None
        if abs(value) > 1e18:
            raise _NotLiteral
        return value
    key = _config_key(node)
    if key is not None and key in known:  # an earlier config.x
        return known[key]
    raise _NotLiteral


def _config_key(node: ast.AST) -> str | None:
    """``x`` for ``config.x`` or ``config["x"]``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        return node.attr
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "config"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
        return node.slice.value
    return None


def read_insightface_config(path: str | Path, known: dict[str, Any] | None = None
                            ) -> tuple[dict[str, Any], list[str]]:
    """The ``config.key = literal`` values of an arcface_torch config file (over ``known``), and a line
    for each statement that was skipped because it is not one. Nothing in the file is executed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InsightFaceConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise InsightFaceConfigError(f"{path}:{exc.lineno}: not valid Python ({exc.msg})") from None
    values = dict(known or {})
    skipped = []
    for statement in tree.body:
        where = f"{path.name}:{statement.lineno}"
        if isinstance(statement, ast.Import | ast.ImportFrom):
            continue
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring or a bare string
        if isinstance(statement, ast.Assign | ast.AnnAssign):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            if (len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id == "config"
                    and isinstance(statement.value, ast.Call)):
                continue  # config = edict()
            keys = [_config_key(t) for t in targets]
            if statement.value is not None and keys and all(keys):
                try:
                    value = _evaluate(statement.value, values)
                except _NotLiteral:
                    shown = "<not shown>" if any(k in _SECRET for k in keys) else ast.get_source_segment(
                        text, statement.value)
                    skipped.append(f"{where}: config.{keys[0]} = {shown} (not a literal; not evaluated)")
                    continue
                for key in keys:
                    values[key] = value
                continue
        first_line = (ast.get_source_segment(text, statement) or "").splitlines()[0][:80]
        skipped.append(f"{where}: {first_line} (not a config.key = literal assignment)")
    return values, skipped


# -- translating -----------------------------------------------------------------------------------------

def _margin(margin_list: Any) -> tuple[dict[str, Any], str]:
    if not (isinstance(margin_list, list | tuple) and len(margin_list) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in margin_list)):
        raise InsightFaceConfigError(f"config.margin_list must be three numbers (m1, m2, m3), got "
                                     f"{margin_list!r}")
    m1, m2, m3 = (float(v) for v in margin_list)
    if m1 == 1.0 and m3 == 0.0:
        name = "arcface" if m2 > 0 else "normface"
    elif m1 == 1.0 and m2 == 0.0:
        name = "cosface"
    else:
        name = "combined"
    return ({"margin": name, "scale": _MARGIN_SCALE, "m1": m1, "m2": m2, "m3": m3,
             "gradient": "straight_through"},
            f"config.margin_list = {tuple(margin_list)!r}: (m1 SphereFace, m2 ArcFace, m3 CosFace)")


def translate_insightface_config(path: str | Path, base: str | Path | None = None,
                                 gpus: int = 8) -> Translation:
    """Translate ``path`` (over ``base``: default its sibling ``base.py``, else arcface_torch's defaults)."""
    path = Path(path)
    if gpus < 1:
        raise InsightFaceConfigError(f"--insightface-gpus must be >= 1, got {gpus}")
    if base is None and (path.parent / "base.py").is_file() and path.name != "base.py":
        base = path.parent / "base.py"
    skipped: list[str] = []
    if base is not None:
        defaults, skipped = read_insightface_config(base)
        base_text = f"over {base}"
    else:
        defaults, base_text = dict(INSIGHTFACE_BASE_DEFAULTS), "over arcface_torch's configs/base.py defaults"
    values, own_skipped = read_insightface_config(path, defaults)
    skipped += own_skipped

    out: dict[str, dict[str, Any]] = {s: {} for s in ("data", "backbone", "loss", "fc", "optim", "schedule",
                                                       "runtime", "eval", "output")}
    comments: dict[tuple[str, str], str] = {}
    used: set[str] = set()

    def put(section: str, key: str, value: Any, comment: str = "", *sources: str) -> None:
        out[section][key] = value
        if comment:
            comments[(section, key)] = comment
        used.update(sources)

    def take(key: str) -> Any:
        used.add(key)
        return values[key]

    # data
    rec = values.get("rec")
    if rec is not None:
        if rec == "synthetic":  # arcface_torch's synthetic-data mode
            put("data", "synthetic", True, "config.rec = 'synthetic'", "rec")
        else:
            put("data", "rec", str(take("rec")), "config.rec")
    if "num_classes" in values:
        put("data", "num_classes", int(take("num_classes")), "config.num_classes")
    if "num_workers" in values:
        put("data", "num_workers", int(take("num_workers")), "config.num_workers (per rank)")
    if "seed" in values:
        put("data", "seed", int(values["seed"]), "config.seed")
    put("data", "flip", True, "arcface_torch augments with a random horizontal flip only")
    # backbone
    if "network" in values:
        network = take("network")
        if network not in _NETWORKS:
            raise InsightFaceConfigError(f"{path}: config.network = {network!r} has no equivalent here "
                                         f"(supported: {', '.join(_NETWORKS)})")
        put("backbone", "name", _NETWORKS[network], f"config.network = {network!r}")
    if "embedding_size" in values:
        put("backbone", "embedding_size", int(take("embedding_size")), "config.embedding_size")
    put("backbone", "dropout", 0.0, "train_v2.py builds the network with dropout=0")
    # loss
    if "margin_list" in values:
        margin, comment = _margin(take("margin_list"))
        for key, value in margin.items():
            put("loss", key, value, comment if key == "margin" else "")
        comments[("loss", "scale")] = "CombinedMarginLoss(64, ...) in train_v2.py"
        comments[("loss", "gradient")] = "its margin is applied under no_grad"
    if "interclass_filtering_threshold" in values:
        put("loss", "interclass_filtering_threshold", float(take("interclass_filtering_threshold")),
            "config.interclass_filtering_threshold")
    # fc
    if "sample_rate" in values:
        put("fc", "sample_rate", float(take("sample_rate")), "config.sample_rate")
    put("fc", "update", "dense", "its SGD decays and moves every FC row each step")
    # optim
    if "optimizer" in values:
        name = take("optimizer")
        if name not in ("sgd", "adamw"):
            raise InsightFaceConfigError(f"{path}: config.optimizer = {name!r} has no equivalent here "
                                         "(sgd, adamw)")
        put("optim", "name", name, "config.optimizer")
    batch_size = values.get("batch_size")
    if "lr" in values:
        put("optim", "lr", float(take("lr")), "config.lr, for the global batch below")
        if batch_size is not None:
            accumulation = int(values.get("gradient_acc", 1))
            spelled = f" x {accumulation} accumulated" if accumulation != 1 else ""
            put("optim", "base_batch_size", int(batch_size) * gpus * accumulation,
                f"config.batch_size x {gpus} GPUs{spelled}: optim.lr applies as is at this global batch")
    if values.get("optimizer", "sgd") == "sgd":
        momentum = values.get("momentum", _TRAIN_V2_MOMENTUM)
        used.add("momentum")
        note = "train_v2.py's SGD momentum" + (f" (it ignores config.momentum = {momentum})"
                                                if momentum != _TRAIN_V2_MOMENTUM else "")
        put("optim", "momentum", _TRAIN_V2_MOMENTUM, note)
    else:
        used.add("momentum")  # AdamW has none
    if "weight_decay" in values:
        put("optim", "weight_decay", float(take("weight_decay")), "config.weight_decay")
    put("optim", "no_decay_bn_bias_prelu", False, "arcface_torch decays every parameter")
    put("optim", "grad_clip", 5.0, "train_v2.py clips the backbone gradient norm at 5")
    if "gradient_acc" in values:
        put("optim", "accumulation_steps", int(take("gradient_acc")),
            "config.gradient_acc (the LR here changes per update, there per micro-batch)")
    # schedule
    put("schedule", "name", "polynomial", "PolynomialLRWarmup: linear warmup, then polynomial decay")
    put("schedule", "power", 1.0, "PolynomialLRWarmup's default power")
    put("schedule", "min_lr", 0.0)
    if "num_epoch" in values:
        put("schedule", "epochs", int(take("num_epoch")), "config.num_epoch")
    if "warmup_epoch" in values:
        put("schedule", "warmup_epochs", float(take("warmup_epoch")), "config.warmup_epoch")
    # runtime
    if "batch_size" in values:
        put("runtime", "batch_size", int(take("batch_size")), "config.batch_size (per GPU)")
    if "fp16" in values:
        put("runtime", "amp", "fp16" if take("fp16") else "none",
            "config.fp16: backbone autocast + grad scaler (the FC logits stay fp32 here)")
    if "seed" in values:
        put("runtime", "seed", int(take("seed")), "config.seed")
    if "frequent" in values:
        put("runtime", "log_every", int(take("frequent")), "config.frequent")
    # eval
    if "val_targets" in values:
        targets = take("val_targets")
        prefix = str(rec) if rec not in (None, "synthetic") else "."
        put("eval", "bins", [f"{prefix}/{name}.bin" for name in targets],
            "config.val_targets: <rec>/<name>.bin, where arcface_torch looks")
    if "verbose" in values:
        put("eval", "every", int(take("verbose")), "config.verbose")
    # output
    output = values.get("output")
    used.add("output")
    put("output", "dir", str(output) if output else f"work_dirs/{path.stem}",
        "config.output" if output else "config.output = None: arcface_torch's work_dirs/<config name>")

    untranslated = list(skipped)
    for key, value in values.items():
        if key in used:
            continue
        if key in _NOT_APPLICABLE:
            untranslated.append(f"config.{key}: no equivalent here ({_NOT_APPLICABLE[key]})")
        else:
            shown = "<not shown>" if key in _SECRET else repr(value)
            untranslated.append(f"config.{key} = {shown}: unknown to this translator, not translated")
    values_out = {section: items for section, items in out.items() if items}
    return Translation(path, values_out, comments, untranslated, base_text)


def main(path: str, gpus: int = 8, stdout: Any = None, stderr: Any = None) -> int:
    """Print the translated recipe (stdout) and what was not translated (stderr); 0, or 2 on errors."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        translation = translate_insightface_config(path, gpus=gpus)
    except InsightFaceConfigError as exc:
        print(f"arcface-train: {exc}", file=stderr)
        return 2
    stdout.write(translation.toml)
    for item in translation.untranslated:
        print(f"arcface-train: not translated: {item}", file=stderr)
    return 0
