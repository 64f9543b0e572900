"""bench/device_check.py: the GPU verification script runs its checks on CPU, and its comparisons fail
when they should."""

from __future__ import annotations

import importlib.util

import pytest

from tests.paths import BENCH

# Loaded from its path: putting bench/ on sys.path would let bench/eval.py shadow the eval package.
_SPEC = importlib.util.spec_from_file_location(
    "device_check", BENCH / "device_check.py")
assert _SPEC is not None and _SPEC.loader is not None
device_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(device_check)


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
