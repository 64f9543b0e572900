"""MetricLogger against hand-computed values on a fake clock, and the arcface-train CLI end to end."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arcface import logging_utils  # noqa: E402
from arcface.logging_utils import MetricLogger, format_duration  # noqa: E402


def test_format_duration_golden() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(2 * 86400 + 3 * 3600 + 7) == "2d 03:00:07"
    assert format_duration(float("inf")) == "?" and format_duration(-1) == "?"


def test_metric_logger_lines_file_and_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 104.0, 104.0, 110.0, 110.0])  # window starts, then the times of the 2 log lines

    monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    logger = MetricLogger(tmp_path, total_steps=4, global_batch_size=10, log_every=2, rank=0,
                          tensorboard=True, progress=False, stream=stream)
    assert logger.update(1, loss=3.0, lr=0.1, data_wait_s=0.5) is None
    line = logger.update(2, loss=5.0, lr=0.2, data_wait_s=0.5, grad_norm=torch.tensor(2.5), epoch=0)
    # 2 updates x 10 samples in 4 s; 1 s of data wait in 4 s; 2 updates left at 2 s each.
    assert line is not None
    assert "step 2/4 epoch 0" in line and "loss 4.0000" in line and "lr 0.2 " in line and "grad 2.5" in line
    assert "5.0 samples/s" in line and "data 25.0%" in line and "eta 0:00:04" in line
    logger.update(3, loss=1.0, lr=0.1)
    last = logger.update(4, loss=2.0, lr=0.1)
    assert last is not None and "loss 1.5000" in last and "3.3 samples/s" in last and "eta 0:00:00" in last
    logger.info("a message")
    logger.close()
    assert stream.getvalue().splitlines() == [line, last, "a message"]
    logged = (tmp_path / logging_utils.LOG_FILE).read_text().splitlines()
    assert [entry.split("] ", 1)[1] for entry in logged] == [line, last, "a message"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 4.0), (4, 1.5)]
    assert [e.value for e in events.Scalars("train/samples_per_s")] == pytest.approx([5.0, 20 / 6])


def test_metric_logger_is_silent_on_other_ranks(tmp_path: Path) -> None:
    stream = io.StringIO()
    logger = MetricLogger(tmp_path / "r1", total_steps=2, global_batch_size=4, log_every=1, rank=1,
                          progress=False, stream=stream)
    assert logger.update(1, loss=1.0, lr=0.1) is None
    logger.info("hidden")
    logger.close()
    assert stream.getvalue() == "" and not (tmp_path / "r1").exists()


def test_cli_rejects_bad_config_with_named_key(capsys: pytest.CaptureFixture[str]) -> None:
    from arcface.train import main

    assert main(["cpu_synthetic", "fc.sample_rate=1.5"]) == 2
    assert "fc.sample_rate" in capsys.readouterr().err
    assert main(["no_such_recipe_xyz"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main([]) == 2  # usage, not "the following arguments are required"
    assert capsys.readouterr().err.startswith("usage: python -m arcface.train")


def test_config_changes_are_what_the_recipe_and_overrides_set() -> None:
    from arcface.config import TrainConfig, load_config

    assert load_config("base", []).changes() == {}
    cfg = load_config("cpu_synthetic", ["fc.sample_rate=0.3"])
    changes = cfg.changes()
    assert changes["fc.sample_rate"] == 0.3 and changes["backbone.name"] == "mobilefacenet"
    assert "loss.margin" not in changes  # cpu_synthetic keeps ArcFace, the default
    assert cfg.changes(load_config("cpu_synthetic", [])) == {"fc.sample_rate": 0.3}
    assert TrainConfig.from_dict({"data": {}}).changes() == {}


def test_quiet_run_prints_nothing_and_a_finished_run_names_the_next_commands(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from arcface.train import main

    small = ["schedule.total_steps=2", "schedule.warmup_steps=1", "runtime.batch_size=4",
             "data.synthetic_num_images=32", "backbone.embedding_size=32", "output.tensorboard=false"]
    assert main(["cpu_synthetic", "-q", f"output.dir={tmp_path / 'quiet'}", *small]) == 0  # options anywhere
    assert capsys.readouterr().out == ""
    assert "step 2/2" in (tmp_path / "quiet" / "train.log").read_text()
    out = tmp_path / "loud"
    assert main(["cpu_synthetic", f"output.dir={out}", *small]) == 0
    printed = capsys.readouterr().out
    assert "set apart from the defaults: data.num_classes=64" in printed
    assert f"arcface-eval --model {out} " in printed and f"arcface-export --model {out} --output" in printed


@pytest.mark.slow
def test_cli_trains_registered_backbone_and_checkpoint_loads(tmp_path: Path) -> None:
    """``arcface-train cpu_synthetic ...`` end to end: config.json, log, and a checkpoint that
    ``arcface.checkpoint.load_backbone`` rebuilds from its stored config alone."""

    from arcface.checkpoint import load_backbone
    from arcface.train import main

    out = tmp_path / "run"
    code = main(["cpu_synthetic", f"output.dir={out}", "schedule.total_steps=2", "schedule.warmup_steps=1",
                 "runtime.batch_size=4", "data.synthetic_num_images=32", "backbone.embedding_size=32",
                 "output.tensorboard=false"])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["backbone"] == {"name": "mobilefacenet", "embedding_size": 32, "dropout": 0.0,
                                 "gradient_checkpointing": False, "width": 0, "blocks": [], "init_from": ""}
    model, meta = load_backbone(out)
    assert meta["step"] == 2 and meta["kind"] == "training"
    weights = torch.load(out / "checkpoints" / "step_00000002" / "backbone.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    assert "step 2/2" in (out / "train.log").read_text()
