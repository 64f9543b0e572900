"""arcface_torch backbone weights in the registry's networks, against files written by arcface_torch.

The reference is arcface_torch's own model: its embeddings of the golden weights (tests/insightface_fixtures).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from backbones import create_backbone, load_insightface_backbone
from backbones.insightface import (
    SUPPORTED_ARCHS,
    InsightFaceWeightsError,
    convert_insightface_state_dict,
    insightface_to_registry_key,
    read_weights_file,
    registry_to_insightface_key,
)
from tests.insightface_fixtures import (
    PFC_RUN,
    golden_embeddings,
    golden_input,
    golden_listing,
    golden_state_dict,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _max_error(model: torch.nn.Module, arch: str) -> tuple[float, float]:
    with torch.no_grad():
        embeddings = model(golden_input())
    reference = golden_embeddings(arch)
    assert embeddings.shape == reference.shape
    return float((embeddings - reference).abs().max()), float(reference.abs().max())


@pytest.mark.parametrize("arch", ["r18", "mbf", pytest.param("r50", marks=pytest.mark.slow),
                                  pytest.param("r100", marks=pytest.mark.slow)])
def test_golden_embeddings_of_arcface_torch(arch: str) -> None:
    model = load_insightface_backbone(golden_state_dict(arch))
    assert not model.training  # eval-ready: BN uses the running statistics, as arcface_torch in eval()
    error, scale = _max_error(model, arch)
    assert error <= 1e-5 * scale, f"{arch}: max |diff| {error:.3g} vs 1e-5 x {scale:.4g}"


def test_every_tensor_is_copied_including_the_frozen_feature_scale() -> None:
    state = golden_state_dict("r18")
    model = load_insightface_backbone(state)
    # arcface_torch keeps features.weight at 1.0 untrained; the file's value must be used, not assumed.
    torch.testing.assert_close(model.head.features.weight.detach(), state["features.weight"], rtol=0, atol=0)
    assert not torch.equal(state["features.weight"], torch.ones(512))
    assert not model.head.features.weight.requires_grad  # still frozen for fine-tuning, as in arcface_torch
    ours = model.state_dict()
    assert len(ours) == len(state) == golden_listing("r18")["state_dict"].__len__()
    for key, value in state.items():
        torch.testing.assert_close(ours[insightface_to_registry_key(key, "iresnet")], value, rtol=0, atol=0)


@pytest.mark.parametrize("arch,name,kwargs,their_name", [
    ("r18", "r18", {"embedding_size": 512}, "r18"),
    ("r50", "r50", {"embedding_size": 512}, "r50"),
    ("r100", "r100", {"embedding_size": 512}, "r100"),
    ("mbf", "mobilefacenet", {"embedding_size": 512}, "mbf"),
])
def test_architecture_and_embedding_size_are_read_from_keys_and_shapes(arch, name, kwargs, their_name):
    # Shapes only: meta tensors, no weights needed.
    state = {e["key"]: torch.empty(e["shape"], device="meta") for e in golden_listing(arch)["state_dict"]}
    converted = convert_insightface_state_dict(state)
    assert (converted.name, converted.kwargs, converted.arch) == (name, kwargs, their_name)


def test_the_partial_fc_run_backbone_file_and_its_run_checkpoint() -> None:
    deployed, source = read_weights_file(PFC_RUN / "model.pt")
    assert source == str(PFC_RUN / "model.pt")
    in_run, run_source = read_weights_file(PFC_RUN / "checkpoint_gpu_0.pt")
    assert "state_dict_backbone" in run_source
    converted = convert_insightface_state_dict(deployed)
    # MobileFaceNet(num_features=64, blocks=(1, 1, 1, 1), scale=1): not a named variant, so spelled out.
    assert (converted.name, converted.kwargs) == ("mobilefacenet", {"embedding_size": 64, "width": 1,
                                                                    "blocks": [1, 1, 1, 1]})
    a = load_insightface_backbone(PFC_RUN / "model.pt")
    b = load_insightface_backbone(PFC_RUN / "checkpoint_gpu_0.pt")
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        assert a(golden_input()).shape == (2, 64)
    # The same network from the registry with the detected arguments takes the weights strictly.
    create_backbone("mobilefacenet", **converted.kwargs).load_state_dict(converted.state_dict)


def test_ddp_module_prefix_is_stripped(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in golden_state_dict("mbf").items()}
    torch.save(state, tmp_path / "backbone.pth")
    error, scale = _max_error(load_insightface_backbone(tmp_path / "backbone.pth"), "mbf")
    assert error <= 1e-5 * scale


def test_arch_argument_asserts_what_the_file_holds() -> None:
    state = {e["key"]: torch.empty(e["shape"], device="meta") for e in golden_listing("r18")["state_dict"]}
    assert convert_insightface_state_dict(state, arch="iresnet18").name == "r18"
    with pytest.raises(InsightFaceWeightsError, match=r"holds an arcface_torch r18 .*not r100"):
        convert_insightface_state_dict(state, arch="r100")
    with pytest.raises(InsightFaceWeightsError, match=r"arcface_torch r18 \(r18\), not mobilefacenet"):
        convert_insightface_state_dict(state, arch="mbf")
    with pytest.raises(InsightFaceWeightsError, match=r"arch 'vit_t'.*unknown backbone"):
        convert_insightface_state_dict(state, arch="vit_t")
    mbf = {e["key"]: torch.empty(e["shape"], device="meta") for e in golden_listing("mbf")["state_dict"]}
    with pytest.raises(InsightFaceWeightsError, match=r"arcface_torch mbf .*not mobilefacenet_large"):
        convert_insightface_state_dict(mbf, arch="mbf_large")


# -- arcface_torch's MobileFaceNet key layout, written out from its structure -------------------------

def _block(prefix: str, in_c: int, out_c: int, kernel: int, groups: int, prelu: bool
           ) -> dict[str, list[int]]:
    """ConvBlock (conv, BN, PReLU) or LinearBlock (conv, BN) under ``prefix`` (their ``.layers``)."""
    keys = {f"{prefix}.layers.0.weight": [out_c, in_c // groups, kernel, kernel]}
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.layers.1.{name}"] = [out_c]
    keys[f"{prefix}.layers.1.num_batches_tracked"] = []
    if prelu:
        keys[f"{prefix}.layers.2.weight"] = [out_c]
    return keys


def _depthwise(prefix: str, in_c: int, out_c: int, groups: int) -> dict[str, list[int]]:
    return {**_block(f"{prefix}.layers.0", in_c, groups, 1, 1, True),
            **_block(f"{prefix}.layers.1", groups, groups, 3, groups, True),
            **_block(f"{prefix}.layers.2", groups, out_c, 1, 1, False)}


def arcface_torch_mbf_shapes(blocks: tuple[int, int, int, int], scale: int, num_features: int
                             ) -> dict[str, list[int]]:
    """Keys and shapes of arcface_torch's ``MobileFaceNet(blocks, scale, num_features)`` state dict."""
    c64, c128 = 64 * scale, 128 * scale
    keys = _block("layers.0", 3, c64, 3, 1, True)
    if blocks[0] == 1:
        keys.update(_block("layers.1", c64, c64, 3, 64, True))
    else:
        for k in range(blocks[0]):
            keys.update(_depthwise(f"layers.1.layers.{k}", c64, c64, 128))
    stages = [(c64, c64, 128, 128, blocks[1]), (c64, c128, 256, 256, blocks[2]),
              (c128, c128, 512, 256, blocks[3])]
    for index, (in_c, out_c, groups, inner, depth) in enumerate(stages):
        keys.update(_depthwise(f"layers.{2 + 2 * index}", in_c, out_c, groups))
        for k in range(depth):
            keys.update(_depthwise(f"layers.{3 + 2 * index}.layers.{k}", out_c, out_c, inner))
    keys.update(_block("conv_sep", c128, 512, 1, 1, True))
    keys.update(_block("features.layers.0", 512, 512, 7, 512, False))
    keys["features.layers.2.weight"] = [num_features, 512]
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"features.layers.3.{name}"] = [num_features]
    keys["features.layers.3.num_batches_tracked"] = []
    return keys


def test_the_mobilefacenet_layout_description_matches_arcface_torch_files() -> None:
    listed = {e["key"]: e["shape"] for e in golden_listing("mbf")["state_dict"]}
    assert arcface_torch_mbf_shapes((1, 4, 6, 2), 2, 512) == listed
    deployed = torch.load(PFC_RUN / "model.pt", weights_only=True)
    assert arcface_torch_mbf_shapes((1, 1, 1, 1), 1, 64) == {k: list(v.shape) for k, v in deployed.items()}


def test_mbf_large_loads_strictly() -> None:
    shapes = arcface_torch_mbf_shapes((2, 8, 12, 4), 4, 512)
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=generator) * 0.05 if s else torch.tensor(0))
             for k, s in shapes.items()}
    converted = convert_insightface_state_dict(state)
    assert (converted.name, converted.kwargs, converted.arch) == (
        "mobilefacenet_large", {"embedding_size": 512}, "mbf_large")
    ours = load_insightface_backbone(state, arch="mbf_large").state_dict()
    for key, value in state.items():
        mapped = insightface_to_registry_key(key, "mobilefacenet", 2)
        torch.testing.assert_close(ours[mapped], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", SUPPORTED_ARCHS)
def test_key_names_map_both_ways(name: str) -> None:
    with torch.device("meta"):
        model = create_backbone(name)
    family = "mobilefacenet" if name.startswith("mobilefacenet") else "iresnet"
    first = 2 if name == "mobilefacenet_large" else 1
    for key in model.state_dict():
        theirs = registry_to_insightface_key(key, family)
        assert theirs is not None, key
        assert insightface_to_registry_key(theirs, family, first) == key


# -- bad files ---------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this would call os.system: a file built from it must be refused, never executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    zipped, legacy = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save({"conv1.weight": _RunsCode(marker)}, zipped)
    with open(legacy, "wb") as handle:
        pickle.dump({"conv1.weight": _RunsCode(marker)}, handle, protocol=2)
    for path in (zipped, legacy):
        with pytest.raises(InsightFaceWeightsError, match=rf"{path.name}: refused: .*could run code"):
            load_insightface_backbone(path)
    assert not marker.exists()


def test_truncated_random_and_non_state_dict_files(tmp_path: Path) -> None:
    data = (PFC_RUN / "model.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InsightFaceWeightsError, match=r"truncated\.pt: cannot read: not a complete PyTorch"):
        load_insightface_backbone(truncated)
    noise = tmp_path / "noise.pth"
    generator = torch.Generator().manual_seed(1)
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=generator).tolist()))
    with pytest.raises(InsightFaceWeightsError, match=r"noise\.pth: not a PyTorch weights file"):
        load_insightface_backbone(noise)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(InsightFaceWeightsError, match=r"tensor\.pth: not a backbone state dict \(got Tensor"):
        load_insightface_backbone(tensor)
    with pytest.raises(InsightFaceWeightsError, match=r"missing\.pth: no such weights file"):
        load_insightface_backbone(tmp_path / "missing.pth")


def test_state_dicts_of_other_architectures_name_the_problem_and_the_closest_arch() -> None:
    # Our own registry layout is not arcface_torch's.
    ours = create_backbone("mobilefacenet", embedding_size=128).state_dict()
    with pytest.raises(InsightFaceWeightsError, match=r"not an arcface_torch IResNet or MobileFaceNet state "
                                                      r"dict \(keys such as stem\.0\.0\.weight.*closest "
                                                      r"supported architecture: mobilefacenet"):
        convert_insightface_state_dict(ours)
    r18 = golden_state_dict("r18")
    # A key missing, one extra, one of the wrong shape: each named, arcface_torch's names.
    damaged = dict(r18)
    del damaged["layer2.1.prelu.weight"]
    damaged["layer1.0.se.fc1.weight"] = torch.zeros(4, 64)
    damaged["layer3.0.conv1.weight"] = torch.zeros(256, 64, 3, 3)
    with pytest.raises(InsightFaceWeightsError) as info:
        convert_insightface_state_dict(damaged, source="damaged.pth")
    message = str(info.value)
    for part in ("damaged.pth: does not load strictly as arcface_torch r18",
                 "1 unexpected keys: layer1.0.se.fc1.weight",
                 "layer3.0.conv1.weight [256, 64, 3, 3] (expected [256, 128, 3, 3])",
                 "1 missing keys: layer2.1.prelu.weight", "closest supported architecture: r18"):
        assert part in message
    # An IResNet whose stages fit no supported layout (r50 with a unit of stage 3 cut away).
    listing = golden_listing("r50")["state_dict"]
    cut = {e["key"]: torch.empty(e["shape"], device="meta") for e in listing
           if not e["key"].startswith("layer3.13.")}
    with pytest.raises(InsightFaceWeightsError, match=r"\(3, 4, 13, 3\) units per stage.*closest supported "
                                                      r"architecture: r50"):
        convert_insightface_state_dict(cut)
    # Trained at another input size: the fc takes another number of inputs.
    resized = dict(r18)
    resized["fc.weight"] = torch.zeros(512, 512 * 4 * 4)
    with pytest.raises(InsightFaceWeightsError, match=r"fc\.weight has shape \[512, 8192\].*512 x 7 x 7"):
        convert_insightface_state_dict(resized)
