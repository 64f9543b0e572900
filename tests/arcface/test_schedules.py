"""LR schedules against hand-computed golden values; the backbone optimiser against hand-written steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from arcface.config import TrainConfig, load_config
from arcface.optim import build_backbone_optimizer, lr_at, param_groups, schedule_for, set_lr


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(None, list(overrides))


# Warmup 10 of 110 updates, base LR 0.1: warmup values 0.1 * (step + 1) / 10, then p = (step - 10) / 100.
POLY = _cfg("schedule.total_steps=110", "schedule.warmup_steps=10")
GOLDEN_POLY = [(0, 0.01), (4, 0.05), (9, 0.1), (10, 0.1), (35, 0.05625), (60, 0.025), (109, 1e-5),
               (110, 0.0), (500, 0.0)]
COSINE = _cfg("schedule.name=cosine", "schedule.total_steps=110", "schedule.warmup_steps=10",
              "schedule.min_lr=0.001")
# p = 0.25: 0.001 + 0.099 * (1 + cos(pi/4)) / 2 = 0.001 + 0.099 * 0.8535534 = 0.0855018
GOLDEN_COSINE = [(0, 0.01), (10, 0.1), (35, 0.0855018), (60, 0.0505), (110, 0.001)]
# 10 epochs of 10 updates, drops at epochs 3 and 6, no warmup.
STEP = _cfg("schedule.name=step", "schedule.epochs=10", "schedule.milestones=[3,6]", "schedule.gamma=0.1")
GOLDEN_STEP = [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (99, 0.001)]


@pytest.mark.parametrize("cfg, golden", [(POLY, GOLDEN_POLY), (COSINE, GOLDEN_COSINE), (STEP, GOLDEN_STEP)],
                         ids=["polynomial", "cosine", "step"])
def test_golden_values(cfg: TrainConfig, golden: list[tuple[int, float]]):
    total = cfg.schedule.total_steps or 100
    for step, expected in golden:
        assert lr_at(step, cfg, total, 0.1) == pytest.approx(expected, abs=1e-7), step
        assert lr_at(step, cfg.schedule, total, 0.1) == lr_at(step, cfg, total, 0.1)  # section works too


def test_polynomial_power_and_min_lr():
    cfg = _cfg("schedule.total_steps=100", "schedule.power=1.0", "schedule.min_lr=0.01")
    # linear from 0.1 to 0.01: halfway = 0.055
    assert lr_at(50, cfg, 100, 0.1) == pytest.approx(0.055)
    assert lr_at(0, cfg, 100, 0.1) == pytest.approx(0.1)


def test_step_schedule_floor_and_epoch_warmup():
    cfg = _cfg("schedule.name=step", "schedule.epochs=10", "schedule.milestones=[3,6]",
               "schedule.min_lr=0.005", "schedule.warmup_epochs=0.5")
    assert lr_at(0, cfg, 100, 0.1) == pytest.approx(0.02)  # warmup of round(0.5 * 10) = 5 updates
    assert lr_at(4, cfg, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(30, cfg, 100, 0.1) == pytest.approx(0.01)
    assert lr_at(60, cfg, 100, 0.1) == pytest.approx(0.005)  # 0.001 floored at min_lr
    # With total_steps set explicitly, epochs are converted with the given steps_per_epoch.
    explicit = _cfg("schedule.name=step", "schedule.milestones=[2]", "schedule.total_steps=1000")
    assert lr_at(39, explicit, 1000, 0.1, steps_per_epoch=20) == pytest.approx(0.1)
    assert lr_at(40, explicit, 1000, 0.1, steps_per_epoch=20) == pytest.approx(0.01)


def test_schedule_is_pure_and_decays_monotonically():
    for cfg in (POLY, COSINE):
        forward = [lr_at(s, cfg, 110, 0.1) for s in range(111)]
        backward = [lr_at(s, cfg, 110, 0.1) for s in reversed(range(111))][::-1]
        assert forward == backward  # no hidden state: call order does not matter
        assert all(a <= b for a, b in zip(forward[:10], forward[1:11]))  # warmup rises
        assert all(a >= b for a, b in zip(forward[10:], forward[11:]))  # then decays
        assert forward[0] > 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, POLY, 110, 0.1)
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, _cfg("schedule.warmup_steps=10"), 5, 0.1)


def test_schedule_for_a_run_uses_global_batch():
    cfg = load_config("ms1mv2_r100", ["schedule.warmup_epochs=1"])
    resolved = schedule_for(cfg, 5_822_653, 8)
    per_epoch = 5_822_653 // 1024
    assert resolved == {"name": "polynomial", "base_lr": pytest.approx(0.1), "total_steps": 20 * per_epoch,
                        "warmup_steps": per_epoch, "steps_per_epoch": per_epoch, "milestone_steps": []}
    # Accumulation: the schedule counts optimiser updates, so the run has half as many with k = 2.
    accumulated = load_config("ms1mv2_r100", ["optim.accumulation_steps=2"])
    assert accumulated.total_steps(5_822_653, 8) == 20 * (5_822_653 // 2048)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 5)
        self.features = nn.BatchNorm1d(5)
        self.features.weight.requires_grad_(False)  # like the E head's fixed BN scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.features(self.fc(x))


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_no_decay_groups():
    model = _Tiny()
    groups = param_groups(model, 5e-4, no_decay_bn_bias_prelu=True)
    assert _names(model, groups[0]["params"]) == {"conv.weight", "fc.weight"}
    assert _names(model, groups[1]["params"]) == {"bn.weight", "bn.bias", "act.weight", "fc.bias",
                                                  "features.bias"}
    assert groups[1]["weight_decay"] == 0.0
    (single,) = param_groups(model, 5e-4, no_decay_bn_bias_prelu=False)
    assert "features.weight" not in _names(model, single["params"])  # frozen: not optimised
    assert len(single["params"]) == 7


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model(torch.randn(3, 3, 6, 6)).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sgd_step_matches_hand_written_update():
    torch.manual_seed(0)
    model = _Tiny()
    cfg = _cfg("optim.no_decay_bn_bias_prelu=true", "optim.weight_decay=0.01", "optim.momentum=0.9")
    optimizer = build_backbone_optimizer(cfg, model, lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    optimizer.step()
    for name, param in model.named_parameters():
        if name == "features.weight":
            assert torch.equal(param, before[name])
            continue
        decay = 0.01 if name in ("conv.weight", "fc.weight") else 0.0
        # first step: momentum buffer = g + wd * w
        expected = before[name] - 0.5 * (grads[name] + decay * before[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)


def test_adamw_step_matches_hand_written_update():
    torch.manual_seed(0)
    model = _Tiny()
    cfg = _cfg("optim.name=adamw", "optim.weight_decay=0.05", "optim.betas=(0.9,0.99)", "optim.eps=1e-6")
    optimizer = build_backbone_optimizer(cfg, model, lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    optimizer.step()
    for name, param in model.named_parameters():
        if name == "features.weight":
            continue
        g = grads[name]
        # step 1: bias-corrected m = g, v = g^2; decoupled decay multiplies w by (1 - lr * wd)
        expected = before[name] * (1 - 0.01 * 0.05) - 0.01 * g / (g.abs() + 1e-6)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7)


def test_set_lr_backbone_and_fc():
    backbone = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    fc = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    fc.param_groups[0]["lr_scale"] = 2.0
    set_lr([backbone, fc], 0.1, fc_lr_scale=3.0)
    assert backbone.param_groups[0]["lr"] == pytest.approx(0.1)
    assert fc.param_groups[0]["lr"] == pytest.approx(0.6)
    set_lr({"fc": fc, "backbone": backbone, "unused": None}, 0.2, fc_lr_scale=1.0)
    assert backbone.param_groups[0]["lr"] == pytest.approx(0.2)
    assert fc.param_groups[0]["lr"] == pytest.approx(0.4)
    set_lr(backbone, 0.3)
    assert backbone.param_groups[0]["lr"] == pytest.approx(0.3)
    assert math.isclose(fc.param_groups[0]["lr"], 0.4)
