"""arcface_torch weights everywhere a model is taken: arcface-export, arcface-eval, arcface-embed, and
fine-tuning with ``backbone.init_from``. References: arcface_torch's own embeddings (golden files) and
the networks loaded independently of the command under test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from arcface.checkpoint import CheckpointError, load_backbone, load_initial_weights
from arcface.deploy import embed, export
from backbones import create_backbone, load_insightface_backbone
from backbones.insightface import insightface_to_registry_key
from eval.cli import main as eval_main
from recordio_tools.synth import render_identity_image
from tests.insightface_fixtures import PFC_RUN, golden_embeddings, golden_input, golden_state_dict
from tests.paths import TEST_DATA

pytestmark = pytest.mark.usefixtures("single_thread")
PAIRS = TEST_DATA / "mxnet_golden" / "pairs.bin"


@pytest.fixture(scope="module")
def mbf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """arcface_torch's mbf with the golden weights, saved the way arcface_torch saves backbone.pth."""
    path = tmp_path_factory.mktemp("mbf") / "backbone.pth"
    torch.save(golden_state_dict("mbf"), path)
    return path


def test_export_of_an_arcface_torch_file_reproduces_arcface_torch(mbf_file: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "onnx"
    code = export.main([str(mbf_file), "-o", str(out), "--arch", "mbf", "--parity-batch-sizes", "1,2",
                        "--latency-runs", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    model = onnx.load(str(out / "model.onnx"))
    assert export.check_contract(model, 512) == []  # one input [batch,3,112,112], one output "embedding"
    card = json.loads((out / "model.json").read_text())
    assert card["parity"]["passed"] is True and card["backbone"] == "mobilefacenet"
    assert card["input"]["color_order"] == "RGB" and card["input"]["layout"] == "NCHW"
    assert (card["input"]["mean"], card["input"]["std"]) == (127.5, 127.5)
    assert "outside the graph" in card["input"]["normalisation"]
    # The exported graph against arcface_torch itself (its embeddings of the golden input).
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input": golden_input().numpy()})[0]
    reference = golden_embeddings("mbf").numpy()
    # BatchNorm folded into the graph changes float32 summation order only: the same 1e-5 of the output
    # scale as the PyTorch model (measured 3e-7).
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


def test_export_refuses_a_wrong_arch_and_a_bad_file(mbf_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code = export.main([str(mbf_file), "-o", str(tmp_path / "a"), "--arch", "r100", "-q"])
    assert code == 2
    assert f"{mbf_file}: holds an arcface_torch mbf (mobilefacenet), not r100" in capsys.readouterr().err
    bad = tmp_path / "glint360k_r100.pth"
    bad.write_bytes(b"\x80\x02not really a pickle")
    code = export.main([str(bad), "-o", str(tmp_path / "b"), "-q"])
    assert code == 2 and f"{bad}: not a PyTorch weights file" in capsys.readouterr().err
    # This project's backbone.pt taken out of its checkpoint directory: not arcface_torch's layout.
    ours = tmp_path / "loose" / "backbone.pt"
    ours.parent.mkdir()
    torch.save(create_backbone("mobilefacenet_s", embedding_size=8).state_dict(), ours)
    code = export.main([str(ours), "-o", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"{ours}: not an arcface_torch IResNet or MobileFaceNet state dict" in err
    assert "give its directory, with its meta.json" in err
    assert not any((tmp_path / d / "model.onnx").exists() for d in "abc")


def test_eval_takes_an_arcface_torch_file(mbf_file: Path, tmp_path: Path) -> None:
    from eval.cli import _model_fingerprint
    from eval.embedder import ModelEmbedder
    from eval.verification import evaluate_pack, load_pack

    out = tmp_path / "report"
    assert eval_main(["--model", str(mbf_file), "--output", str(out), "--bin", str(PAIRS), "--arch",
                      "mobilefacenet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["given"] == str(mbf_file) and report["model"]["kind"] == "arcface_torch weights"
    assert report["model"]["path"] == str(mbf_file.resolve())
    got = report["verification"][0]
    expected = evaluate_pack(ModelEmbedder(load_insightface_backbone(golden_state_dict("mbf"))),
                             load_pack(PAIRS)).to_dict()
    assert got["num_pairs"] == expected["num_pairs"] == 12
    # The mean flip-summed embedding norm: a continuous function of every embedding (accuracies of 12
    # pairs could flip on a 1e-7 difference in summation order between the two embedders).
    assert got["norm_mean"] == pytest.approx(expected["norm_mean"], rel=1e-5)
    # MegaFace feature folders are tied to the weights file itself.
    assert _model_fingerprint(str(mbf_file), True)["weights"] == str(mbf_file.resolve())


def test_eval_refuses_a_pickle_that_would_run_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "executed"

    class RunsCode:
        def __reduce__(self):  # noqa: ANN204
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "model.pt"
    torch.save({"fc.weight": RunsCode()}, evil)
    assert eval_main(["--model", str(evil), "--output", str(tmp_path / "r"), "--bin", str(PAIRS)]) == 2
    assert f"{evil}: refused" in capsys.readouterr().err
    assert not marker.exists()


def test_embed_takes_an_arcface_torch_file(tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    for index in range(3):
        cv2.imwrite(str(faces / f"{index}.png"), render_identity_image(index, 0, 5))
    out = tmp_path / "emb.npy"
    assert embed.main([str(PFC_RUN / "model.pt"), str(faces), "-o", str(out), "-q"]) == 0
    got = np.load(out)
    # Independent reference: arcface_torch's deployed file, loaded by itself, on hand-normalised RGB.
    model = load_insightface_backbone(PFC_RUN / "model.pt")
    rgb = np.stack([cv2.imread(str(faces / f"{i}.png"))[:, :, ::-1] for i in range(3)]).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(((rgb - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())).numpy()
    assert got.shape == (3, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_arcface_torch_output_folder_and_run_checkpoint(tmp_path: Path) -> None:
    model_dir, meta = load_backbone(PFC_RUN)  # the folder train_v2.py writes: its model.pt
    assert meta["source"]["file"] == str(PFC_RUN / "model.pt")
    model_ckpt, _ = load_backbone(PFC_RUN / "checkpoint_gpu_0.pt")
    for key, value in model_dir.state_dict().items():
        assert torch.equal(model_ckpt.state_dict()[key], value)
    assert meta["config"]["backbone"] == {"name": "mobilefacenet", "embedding_size": 64, "width": 1,
                                          "blocks": [1, 1, 1, 1]}


# -- fine-tuning -----------------------------------------------------------------------------------------

def _finetune_overrides(out: Path, init_from: Path, *extra: str) -> list[str]:
    return ["data.synthetic=true", "data.synthetic_num_images=32", "data.num_classes=10",
            "data.num_workers=0",
            "backbone.name=mobilefacenet", "backbone.embedding_size=64", "backbone.width=1",
            "backbone.blocks=[1,1,1,1]", f"backbone.init_from={init_from}", "runtime.batch_size=4",
            "runtime.device=cpu", "schedule.total_steps=4", "schedule.warmup_steps=1", "eval.every=0",
            f"output.dir={out}", "output.tensorboard=false", *extra]


def test_init_from_starts_from_the_weights_with_a_new_head(tmp_path: Path) -> None:
    from arcface.config import load_config
    from arcface.train import train

    deployed = torch.load(PFC_RUN / "model.pt", weights_only=True)
    cfg = load_config(None, _finetune_overrides(tmp_path / "ft", PFC_RUN / "model.pt"))
    summary = train(cfg, max_steps=0)  # no update: the step-0 checkpoint holds what was loaded
    start = Path(summary["checkpoint"])
    saved = torch.load(start / "backbone.pt", weights_only=True)
    for key, value in deployed.items():
        assert torch.equal(saved[insightface_to_registry_key(key, "mobilefacenet")], value), key
    log = (tmp_path / "ft" / "train.log").read_text()
    assert (f"backbone initialised from arcface_torch MobileFaceNet(blocks=(1, 1, 1, 1), scale=1) "
            f"(mobilefacenet, embedding size 64, width=1, blocks=[1, 1, 1, 1]) from {PFC_RUN / 'model.pt'}"
            in log)
    assert "the FC head starts from scratch" in log
    # A fresh FC: 10 classes here, 1001 in the arcface_torch run.
    fc = torch.load(next(start.glob("fc_shard_*.pt")), weights_only=True)
    assert fc["weight"].shape == (10, 64)

    # Our own checkpoint works as init_from too, and training then runs.
    again = load_config(None, _finetune_overrides(tmp_path / "ft2", start))
    summary = train(again, max_steps=1)
    assert summary["step"] == 1 and np.isfinite(summary["losses"][0])
    log = (tmp_path / "ft2" / "train.log").read_text()
    assert f"backbone initialised from checkpoint {start} (step 0)" in log


def test_init_from_a_different_network_says_which_settings_to_use(tmp_path: Path) -> None:
    model = create_backbone("r18", embedding_size=64)
    with pytest.raises(CheckpointError, match=r"backbone\.init_from: .*is backbone mobilefacenet .*but the "
                                              r"config builds r18 .*set backbone\.name=mobilefacenet "
                                              r"backbone\.embedding_size=64 backbone\.width=1 "
                                              r"backbone\.blocks=\[1,1,1,1\]"):
        load_initial_weights(model, PFC_RUN / "model.pt", {"name": "r18", "embedding_size": 64})
    # Through the command line: a clear message and a non-zero exit, nothing trained.
    from arcface.train import main

    shutil.rmtree(tmp_path / "cli", ignore_errors=True)
    code = main(["cpu_synthetic", *_finetune_overrides(tmp_path / "cli", PFC_RUN / "model.pt",
                                                       "backbone.embedding_size=32")])
    assert code == 1
    assert not (tmp_path / "cli" / "checkpoints").exists()
