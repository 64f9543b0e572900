"""bench/device_check.py: the GPU verification script runs its checks on CPU, and its comparisons fail
when they should."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import device_check  # noqa: E402


def test_comparison_flags_drift_and_non_finite_losses() -> None:
    assert device_check._compare([2.0, 1.0], [2.0, 1.005], 1e-2)[0]
    assert not device_check._compare([2.0, 1.0], [2.0, 1.1], 1e-2)[0]
    assert not device_check._compare([2.0, float("nan")], [2.0, 1.0], 1e-2)[0]


@pytest.mark.slow
def test_every_check_passes_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert device_check.main(["--device", "cpu", "--compile-backend", "aot_eager"]) == 0
    table = capsys.readouterr().out
    for check in ("partial_fc", "process group", "loader", "train fp32", "train compile"):
        assert f"| {check}" in table
    assert "FAIL" not in table
