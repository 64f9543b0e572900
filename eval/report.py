"""Evaluation report: ``report.md`` (one table: every target, every number), ``report.json`` and PNGs.

Written atomically (temporary names, then rename) into the output folder; the PNGs are ROC curves per
target family, CMC curves and genuine-vs-impostor score histograms.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval import plots
from eval.embedder import describe_model
from eval.ijb import IJBResult
from eval.megaface import MegaFaceResult
from eval.verification import VerificationResult, format_far

__all__ = ["report_rows", "report_warnings", "write_report"]


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}%"


def report_rows(verification: Sequence[VerificationResult] = (), ijb: Sequence[IJBResult] = (),
                megaface: Sequence[MegaFaceResult] = ()) -> list[tuple[str, str, str]]:
    """``(target, metric, value)`` rows of the report table."""
    rows: list[tuple[str, str, str]] = []
    for r in verification:
        accuracy = f"{_pct(r.accuracy_mean)} +- {_pct(r.accuracy_std)}"
        accuracy += " (COLLAPSED MODEL: chance)" if r.collapsed else ""
        val = f"{_pct(r.val_at_far_1e3)} +- {_pct(r.val_at_far_1e3_std)} at FAR {format_far(r.far_at_val)}"
        val += "" if r.val_far_reachable else " (target not reachable)"
        rows += [(r.name, "accuracy (10-fold)", accuracy),
                 (r.name, f"VAL at FAR target {format_far(r.val_far_target)}", val),
                 (r.name, "best threshold (squared L2)", f"{r.best_threshold:.2f} "
                                                         f"(accuracy {_pct(r.best_threshold_accuracy)})"),
                 (r.name, "embedding norm (mean)", f"{r.norm_mean:.2f}"),
                 (r.name, "pairs", str(r.num_pairs))]
    for r in ijb:
        for far, value in r.tar_nearest.items():
            rows.append((r.name, f"TAR@FAR={far} (nearest ROC point)", _pct(value)))
        for far, value in r.tar_interpolated.items():
            rows.append((r.name, f"TAR@FAR={far} (interpolated)", _pct(value)))
        for gallery, stats in r.identification.items():
            for key, value in stats.items():
                if key.startswith(("rank", "tpir")):
                    rows.append((f"{r.name} 1:N {gallery}", key, _pct(value)))
        rows.append((r.name, "images / templates / pairs",
                     f"{r.num_images} / {r.num_templates} / {r.num_pairs}"))
    for r in megaface:
        target = f"MegaFace ({r.num_distractors} distractors)"
        rows.append((target, "rank-1 identification", _pct(r.rank1)))
        for far, value in r.tar_at_far.items():
            rows.append((target, f"TAR@FAR={far}", _pct(value)))
        rows.append((target, "probe searches", str(r.num_searches)))
    return rows


def report_warnings(verification: Sequence[VerificationResult] = ()) -> list[str]:
    """Results that must not be read at face value: collapsed models, VAL targets out of reach."""
    warnings = []
    for r in verification:
        if r.collapsed:
            warnings.append(f"{r.name}: {r.collapse_warning()}")
        if not r.val_far_reachable:
            warnings.append(f"{r.name}: no threshold reaches FAR {format_far(r.val_far_target)}; VAL "
                            f"{_pct(r.val_at_far_1e3)} is measured at FAR {format_far(r.far_at_val)}")
    return warnings


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(output: str | os.PathLike[str], model: dict[str, Any] | str | None,
                 verification: Sequence[VerificationResult] = (), ijb: Sequence[IJBResult] = (),
                 megaface: Sequence[MegaFaceResult] = (), extra: dict[str, Any] | None = None) -> Path:
    """Write report.md, report.json, PNG plots and IJB score arrays into ``output``; return report.md.

    ``model`` is the evaluated model as :func:`eval.embedder.model_identity` describes it (a plain path
    is taken as what the user gave; ``None``: no model, features read from folders).
    """
    if isinstance(model, str | os.PathLike):
        model = {"given": str(model), "kind": "unknown", "path": None, "step": None, "config_sha256": None}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    images: list[str] = []
    if verification:
        images.append(plots.plot_roc({r.name: (r.roc_fpr, r.roc_tpr) for r in verification},
                                     output / "roc_verification.png", "Verification packs (10-fold mean ROC)",
                                     min_fpr=1e-3).name)
        for r in verification:
            # Histograms in cosine terms (cos = 1 - d/2 for unit vectors) so every plot reads the same way.
            cos = 1.0 - r.distances / 2.0
            images.append(plots.plot_score_histogram(
                cos[r.issame], cos[~r.issame], output / f"hist_{r.name}.png", f"{r.name}: pair scores",
                threshold=1.0 - r.best_threshold / 2.0).name)
    for r in ijb:
        images.append(plots.plot_roc({r.name: (r.roc_fpr, r.roc_tpr)}, output / f"roc_{r.name}.png",
                                     f"{r.name} 1:1 verification").name)
        images.append(plots.plot_score_histogram(r.scores[r.labels], r.scores[~r.labels],
                                                 output / f"hist_{r.name}.png",
                                                 f"{r.name}: template pairs").name)
        np.save(output / f"{r.name}_scores.npy", r.scores)
        np.save(output / f"{r.name}_labels.npy", r.labels)
        cmcs = {f"{r.name} {g}": s["cmc"] for g, s in r.identification.items()}
        if cmcs:
            images.append(plots.plot_cmc(cmcs, output / f"cmc_{r.name}.png", f"{r.name} 1:N").name)
    if megaface:
        images.append(plots.plot_cmc({f"{r.num_distractors} distractors": r.cmc for r in megaface},
                                     output / "cmc_megaface.png", "MegaFace identification").name)
        largest = max(megaface, key=lambda r: r.num_distractors)
        images.append(plots.plot_score_histogram(
            largest.genuine_scores, largest.impostor_top, output / "hist_megaface.png",
            "MegaFace: genuine pairs vs the highest impostor scores kept").name)

    rows = report_rows(verification, ijb, megaface)
    when = dt.datetime.now().isoformat(timespec="seconds")
    warnings = report_warnings(verification)
    lines = ["# Evaluation report", "", f"- model: {describe_model(model)}"]
    if model and model.get("given") and model["given"] != model.get("path"):
        lines.append(f"- model as given: `{model['given']}`")
    lines.append(f"- date: {when}")
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    lines.append("")
    for text in warnings:
        lines += [f"> **Warning:** {text}", ""]
    lines += ["| target | metric | value |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
    lines += ["", "Accuracy: standard protocol (flip-sum, L2, squared distance, 10 ordered folds). IJB TAR "
              "is read from the template-pair ROC: 'nearest' = the ROC point whose FAR is closest to the "
              "target (the common reading), 'interpolated' = the ROC staircase read at exactly the target "
              "(straight between consecutive points, never above the curve).", ""]
    lines += [f"![{name}]({name})" for name in images]
    report_md = output / "report.md"
    _atomic_text(report_md, "\n".join(lines) + "\n")
    payload = {"model": model, "date": when, "extra": extra or {}, "warnings": warnings,
               "verification": [r.to_dict() for r in verification], "ijb": [r.to_dict() for r in ijb],
               "megaface": [r.to_dict() for r in megaface],
               "table": [{"target": t, "metric": m, "value": v} for t, m, v in rows], "plots": images}
    _atomic_text(output / "report.json", json.dumps(payload, indent=2))
    return report_md
