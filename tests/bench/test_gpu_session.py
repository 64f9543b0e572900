"""bench/gpu_session.py and the benchmarks it runs: every part runs on CPU (so the GPU session cannot rot
between lent machines), the row syntax is checked, and the largest Partial FC size is the boundary of
the memory formula."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from arcface.config import RuntimeConfig
from tests.paths import BENCH


def _load(name: str) -> ModuleType:
    # Loaded from its path: putting bench/ on sys.path would let bench/eval.py shadow the eval package.
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_row_specs_parse_and_bad_ones_are_named() -> None:
    throughput = _load("train_throughput")
    row = throughput.Row.parse("r100,256,bf16,cl,compile")
    assert (row.backbone, row.batch, row.amp, row.channels_last, row.compile) == (
        "r100",
        256,
        "bf16",
        True,
        True,
    )
    # Plain "compile" takes the config's default scope; a scope after a colon is that scope.
    assert row.compile_scope == RuntimeConfig().compile_scope
    assert throughput.Row.parse("r100,256,bf16,cl,compile:model").compile_scope == "model"
    assert throughput.Row.parse("r100,256,bf16,cl,compile:blocks").compile_scope == "blocks"
    assert not throughput.Row.parse("r50, 128, fp16, nchw").channels_last
    for bad in (
        "r100,256,bf16",
        "r100,x,bf16,cl",
        "r100,256,fp8,cl",
        "r100,256,bf16,nhwc",
        "r100,256,bf16,cl,jit",
        "r100,256,bf16,cl,compile:layers",
        "r100,256,bf16,cl,compile:model:x",
    ):
        with pytest.raises(ValueError, match="BACKBONE,BATCH,AMP,LAYOUT"):
            throughput.Row.parse(bad)


@pytest.mark.parametrize("world_size", [1, 3])
def test_largest_class_count_is_the_boundary_of_the_memory_formula(world_size: int) -> None:
    from arcface.head.partial_fc import partial_fc_memory_bytes

    partial_fc = _load("partial_fc")

    def per_rank_bytes(classes: int) -> int:
        return sum(partial_fc_memory_bytes(-(-classes // world_size), 512, 0.1, "sparse", 512).values())

    limit = 40 * 2**30
    largest = partial_fc.largest_classes(limit, 512, 512, world_size, 100_000)
    assert largest % 100_000 == 0 and largest > 0
    assert per_rank_bytes(largest) <= limit < per_rank_bytes(largest + 100_000)
    assert partial_fc.largest_classes(1.0, 512, 512, world_size, 100_000) == 0


def test_memory_formula_of_a_shard_is_the_module_function() -> None:
    from arcface.head.margins import build_margin
    from arcface.head.partial_fc import PartialFC, partial_fc_memory_bytes
    from arcface.head.partition import ClassPartition

    for rate, update in ((1.0, "sparse"), (0.3, "sparse"), (0.3, "dense")):
        pfc = PartialFC(ClassPartition(1000, 1, 0), 8, build_margin("arcface"), rate, update)
        for optimizer in ("sgd", "adamw"):
            assert pfc.memory_bytes(64, optimizer) == partial_fc_memory_bytes(
                1000, 8, rate, update, 64, optimizer
            )
    # Rate 0.3 of 1000 rows samples 300: the sparse SGD step's two row buffers are 8 * 300 * D bytes.
    sparse = partial_fc_memory_bytes(1000, 8, 0.3, "sparse", 64)
    assert sparse["optimizer"] == 4 * 1000 * 8 + 8 * 300 * 8


@pytest.mark.slow
def test_every_part_of_the_gpu_session_runs_on_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session = _load("gpu_session")
    assert session.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "session.md").read_text()
    for part in session.PART_NAMES:
        assert f"| {part} | ok |" in summary
    logs = {part: (tmp_path / f"{part}.log").read_text() for part in session.PART_NAMES}
    assert "| train fp32 (vs CPU) | PASS" in logs["check"]
    assert "| train compile aot_eager (vs eager) | PASS" in logs["compile"]
    assert "| mobilefacenet_s | 4 | none | channels_last | blocks | synthetic |" in logs["compile"]
    assert "MFU" in logs["throughput"] and "largest class count" in logs["partial_fc"]
    assert "RecordIO, 2 workers" in logs["data"] and "demo summary" in logs["demo"]
    assert capsys.readouterr().out.rstrip().endswith("```")  # the summary is printed last
