"""arcface.compiling: regional compilation (``runtime.compile_scope = "blocks"``) finds the repeated blocks
of every registered backbone, compiles identical blocks once, and computes what the eager network
computes; the module tree (state_dict keys) is left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from arcface.compiling import compile_backbone, compile_regions
from backbones import create_backbone, list_backbones
from backbones.iresnet import LAYOUTS, IRBlock
from backbones.mobilefacenet import Bottleneck


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code is cached per code object across tests; every test counts its own graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the statistics
    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


def _expected_regions(name: str) -> int:
    """Repeated units counted from the architecture's definition, not from the module tree."""
    if name in LAYOUTS:
        return sum(LAYOUTS[name])
    # MobileFaceNet: each of the 3 stages has a strided first unit plus ``blocks[i]`` residual units; the
    # stem holds ``blocks[0]`` units when blocks[0] > 1 (otherwise one depthwise conv, no unit).
    blocks = {"mobilefacenet": (1, 4, 6, 2), "mobilefacenet_s": (1, 4, 6, 2),
              "mobilefacenet_large": (2, 8, 12, 4)}[name]
    return (blocks[0] if blocks[0] > 1 else 0) + sum(b + 1 for b in blocks[1:])


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_has_its_repeated_blocks_found(name: str) -> None:
    """A new backbone without ``repeated_blocks`` fails here instead of silently compiling nothing."""
    with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
        model = create_backbone(name)
    regions = compile_regions(model)
    assert len(regions) == _expected_regions(name)
    assert all(isinstance(r, (IRBlock, Bottleneck)) for r in regions)
    # No region inside another (each unit compiled once) and the backbone itself is not one.
    inner = {id(m) for r in regions for m in r.modules() if m is not r}
    assert not any(id(r) in inner for r in regions) and all(r is not model for r in regions)


def test_a_backbone_without_repeated_blocks_is_refused_with_the_key_named() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match="runtime.compile_scope"):
        compile_regions(net)
    with pytest.raises(ValueError, match="repeated_blocks"):
        compile_backbone(net, net, "blocks", "eager")


def _train_step(model: nn.Module, backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    embeddings = model(images)
    # A fixed random projection: the embedding ends in BatchNorm1d, so a loss like mean(e**2) would be
    # constant over the batch and leave only rounding noise as gradient.
    probe = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1)).to(embeddings.dtype)
    (embeddings * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    return embeddings.detach(), grads


@pytest.mark.parametrize("name, graphs", [
    ("r18", 8),  # first unit (strided, 1x1 shortcut) and the other unit of each of the 4 stages
    ("mobilefacenet_s", 6),  # strided first unit and residual units of each of the 3 stages
])
def test_regional_compile_equals_eager_and_identical_blocks_share_a_graph(
        name: str, graphs: int, single_thread: None) -> None:
    """aot_eager traces each block into an ATen graph and runs it without code generation: the same
    kernels on the same tensors in the same order as eager, so forward output, every parameter gradient
    and the BN running statistics agree to float32 rounding (1e-6 relative, far below any change a
    wrong graph, a missed buffer update or a block run twice would make)."""
    torch.manual_seed(0)
    eager = create_backbone(name, embedding_size=64).train()
    compiled = create_backbone(name, embedding_size=64).train()
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    images = torch.randn(2, 3, 112, 112)

    model = compile_backbone(compiled, compiled, "blocks", "aot_eager")
    assert model is compiled and list(compiled.state_dict()) == keys  # in place: same tree, same keys
    out, grads = _train_step(model, compiled, images)
    ref_out, ref_grads = _train_step(eager, eager, images)

    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for key, grad in ref_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-6, atol=1e-7, msg=key)
    ref_state = eager.state_dict()
    for key, value in compiled.state_dict().items():  # running mean/var updated once, as in eager
        torch.testing.assert_close(value, ref_state[key], rtol=1e-6, atol=1e-7, msg=key)
    # All units of one shape reuse one compiled graph: the count is the number of distinct unit shapes.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_the_recompile_limit_covers_every_region() -> None:
    """Dynamo keeps at most recompile_limit graphs per code object, then runs eagerly: regional compile
    raises it to the number of regions so a varied backbone never loses its compiled tail."""
    torch._dynamo.config.recompile_limit = 8
    with torch.device("meta"):
        model = create_backbone("r100")
    compile_backbone(model, model, "blocks", "eager")
    assert torch._dynamo.config.recompile_limit == sum(LAYOUTS["r100"])


def test_model_scope_wraps_the_whole_module() -> None:
    net = nn.Linear(3, 2)
    wrapped = compile_backbone(net, net, "model", "eager")
    assert wrapped._orig_mod is net
    with pytest.raises(ValueError, match="compile_scope"):
        compile_backbone(net, net, "everything", "eager")


@pytest.mark.slow
def test_regional_inductor_is_as_close_to_float64_as_eager(single_thread: None) -> None:
    """inductor generates fused C++ kernels whose reductions sum in another order, so it cannot equal
    eager bit for bit; and this backward (BatchNorm over a batch of 8 at 7x7, 20 units deep) is badly
    conditioned: eager float32 itself is ~0.5% off float64 in the worst gradient. The independent
    reference is therefore the float64 network: the compiled run must be about as close to it as eager
    float32 is (measured: 1.0% vs 0.5%); a wrong graph or a unit run twice is off by O(1)."""
    torch.manual_seed(0)
    initial = create_backbone("mobilefacenet_s", embedding_size=32).train()
    nets = {}
    for kind in ("eager", "inductor", "float64"):
        nets[kind] = create_backbone("mobilefacenet_s", embedding_size=32).train()
        nets[kind].load_state_dict(initial.state_dict())
    nets["float64"].double()
    images = torch.randn(8, 3, 112, 112)
    compiled = compile_backbone(nets["inductor"], nets["inductor"], "blocks", "inductor")
    out, grads = _train_step(compiled, nets["inductor"], images)
    eager_out, eager_grads = _train_step(nets["eager"], nets["eager"], images)
    ref_out, ref_grads = _train_step(nets["float64"], nets["float64"], images.double())
    largest = max(g.norm() for g in ref_grads.values())

    def worst(found: dict) -> float:  # relative error of the worst non-negligible gradient
        return max(float((found[k].double() - g).norm() / g.norm()) for k, g in ref_grads.items()
                   if g.norm() > 1e-3 * largest)

    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    assert worst(grads) <= 4 * worst(eager_grads) + 1e-4, (worst(grads), worst(eager_grads))
