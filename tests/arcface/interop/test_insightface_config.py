"""arcface_torch config files (configs/*.py) translated into TOML recipes, read without executing them.

The example files in tests/data/insightface_configs* are written in arcface_torch's format: a base.py
and a job config (applied over it, as arcface_torch's get_config does), and a job config without a base
that also holds keys and statements a translator must list rather than drop or run.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from arcface.config import load_config
from arcface.interop.insightface_config import InsightFaceConfigError, translate_insightface_config
from arcface.optim import lr_at
from arcface.train import main as train_main
from tests.paths import TEST_DATA

DATA = TEST_DATA
MS1MV3 = DATA / "insightface_configs" / "ms1mv3_r50.py"
GLINT = DATA / "insightface_configs_nobase" / "glint360k_mbf_cosface.py"


def _recipe(tmp_path: Path, source: Path, gpus: int = 8):  # noqa: ANN202
    translation = translate_insightface_config(source, gpus=gpus)
    path = tmp_path / f"{source.stem}.toml"
    path.write_text(translation.toml)
    return translation, load_config(path)


def polynomial_lr_warmup(step: int, base_lr: float, warmup: int, total: int, power: float = 1.0) -> float:
    """arcface_torch's PolynomialLRWarmup, closed form: the LR of update ``step`` (0-based), steps > 0."""
    if step <= warmup:
        return base_lr * step / warmup
    return base_lr * (1.0 - (min(total, step) - warmup) / (total - warmup)) ** power


def test_ms1mv3_r50_over_its_base(tmp_path: Path) -> None:
    translation, cfg = _recipe(tmp_path, MS1MV3)
    assert "over " + str(MS1MV3.parent / "base.py") in translation.toml
    assert (cfg.data.rec, cfg.data.num_classes, cfg.data.num_workers) == (
        "/train_tmp/ms1m-retinaface-t1", 93431, 2)
    assert (cfg.backbone.name, cfg.backbone.embedding_size) == ("r50", 512)
    assert (cfg.loss.margin, cfg.loss.scale, cfg.loss.m1, cfg.loss.m2, cfg.loss.m3) == (
        "arcface", 64.0, 1.0, 0.5, 0.0)
    assert cfg.loss.gradient == "straight_through"
    assert (cfg.fc.sample_rate, cfg.fc.update) == (1.0, "dense")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd", 0.1, 0.9, 5e-4)
    assert (cfg.runtime.batch_size, cfg.runtime.amp, cfg.runtime.seed, cfg.runtime.log_every) == (
        128, "fp16", 2048, 10)
    assert (cfg.schedule.name, cfg.schedule.power, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (
        "polynomial", 1.0, 20, 0.0)
    assert cfg.eval.bins == [f"/train_tmp/ms1m-retinaface-t1/{n}.bin" for n in ("lfw", "cfp_fp", "agedb_30")]
    assert (cfg.eval.every, cfg.output.dir) == (2000, "work_dirs/ms1mv3_r50")
    # On the 8 GPUs of the original run the LR is config.lr itself, and every update's LR is the one
    # arcface_torch's PolynomialLRWarmup gives it (MS1MV3: 5,179,510 images).
    assert cfg.scaled_lr(8) == 0.1
    total = cfg.total_steps(5179510, 8)
    assert total == 5179510 // (128 * 8) * 20
    for step in range(1, total + 50):
        assert lr_at(step, cfg, total, cfg.scaled_lr(8)) == pytest.approx(
            polynomial_lr_warmup(step, 0.1, 0, total), rel=1e-12, abs=0.0), step
    # The base's Weights & Biases key is listed, its value never shown.
    listed = "\n".join(translation.untranslated)
    assert "config.wandb_key: no equivalent here" in listed and "XXXXXXXX" not in translation.toml


def test_a_config_without_base_with_keys_and_code_to_list(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the file's os.system call would leave its marker if it ran
    translation, cfg = _recipe(tmp_path, GLINT, gpus=16)
    assert not (tmp_path / "EXECUTED_MARKER").exists()
    assert "arcface_torch's configs/base.py defaults" in translation.toml
    assert (cfg.loss.margin, cfg.loss.m2, cfg.loss.m3) == ("cosface", 0.0, 0.4)
    assert (cfg.backbone.name, cfg.fc.sample_rate, cfg.optim.accumulation_steps) == ("mobilefacenet", 0.1, 2)
    assert cfg.schedule.warmup_epochs == 2.0  # config.num_epoch // 10, evaluated from the literal above it
    assert (cfg.runtime.log_every, cfg.data.num_workers) == (10, 2)  # arcface_torch's base defaults
    # 16 GPUs x 256 x 2 accumulated micro-batches: config.lr as is, and after warmup the same LR per sample
    # position as arcface_torch (its steps count micro-batches: step s there is update s / 2 here).
    assert cfg.scaled_lr(16) == 0.2
    num_images = 17091657
    total, warmup = cfg.total_steps(num_images, 16), cfg.warmup_steps(num_images, 16)
    their_total, their_warmup = num_images // (256 * 16) * 20, num_images // (256 * 16) * 2
    assert (2 * total, 2 * warmup) == (their_total, their_warmup)
    for update in range(warmup, total, 97):
        assert lr_at(update, cfg, total, 0.2) == pytest.approx(
            polynomial_lr_warmup(2 * update, 0.2, their_warmup, their_total), rel=1e-12)
    listed = "\n".join(translation.untranslated)
    for expected in ("config.label_smoothing = 0.1: unknown to this translator",
                     "glint360k_mbf_cosface.py:34: config.rec_cache = os.path.join",
                     "glint360k_mbf_cosface.py:35: config.log_dir = f\"{config.output}/logs\" (not a literal",
                     "glint360k_mbf_cosface.py:36: config.hook = __import__(\"os\").system",
                     "glint360k_mbf_cosface.py:37: if config.fp16: (not a config.key = literal assignment)",
                     "config.dali: no equivalent here", "config.dali_aug: no equivalent here",
                     "config.resume: no equivalent here (to continue an arcface_torch run use "
                     "output.resume_from_insightface"):
        assert expected in listed, expected
    assert cfg.optim.lr == 0.2  # the `if` is listed, not followed
    assert "0123456789abcdef" not in translation.toml + listed
    # Every untranslated item is in the recipe's header too, as a comment.
    header = translation.toml.split("\n[")[0]
    assert all(item in header for item in translation.untranslated)
    assert tomllib.loads(translation.toml)["optim"]["base_batch_size"] == 256 * 16 * 2


def test_command_line_prints_the_recipe_and_lists_the_rest(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert train_main(["--from-insightface-config", str(GLINT), "--insightface-gpus", "16"]) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["backbone"]["name"] == "mobilefacenet"
    assert "arcface-train: not translated: config.label_smoothing = 0.1" in err
    unsupported = tmp_path / "vit.py"
    unsupported.write_text('config = edict()\nconfig.network = "vit_t"\n')
    assert train_main(["--from-insightface-config", str(unsupported)]) == 2
    assert "config.network = 'vit_t' has no equivalent here" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("config.lr = (\n")
    assert train_main(["--from-insightface-config", str(broken)]) == 2
    assert f"{broken}:1: not valid Python" in capsys.readouterr().err
    assert train_main([]) == 2  # neither a recipe nor a file to translate: the usage
    assert capsys.readouterr().err.startswith("usage:")
    assert train_main(["--quiet"]) == 2
    assert "a recipe is required" in capsys.readouterr().err


def test_margins_and_bad_values() -> None:
    from arcface.interop.insightface_config import _margin

    assert _margin((1.0, 0.0, 0.0))[0]["margin"] == "normface"
    assert _margin((1.0, 0.3, 0.2))[0]["margin"] == "combined"
    with pytest.raises(InsightFaceConfigError, match="three numbers"):
        _margin((1.0, 0.5))
