import json

import pytest
import torch

from anima_lib.flow_training import FlowMatchingConfig, load_ema_into, sample_times, train_flow_matching


class TinyField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3 + 1 + 2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3))

    def velocity(self, x, sigma, context):
        return self.net(torch.cat([x, sigma[:, None], context[:, 0]], dim=1))


def batches(step, generator):
    x0 = torch.randn(16, 3, generator=generator) * 0.5 + 1.0
    context = torch.randn(16, 1, 2, generator=generator)
    return x0, context


def run(tmp_path, steps, every=3):
    field = TinyField()
    cfg = FlowMatchingConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, checkpoint_every=every,
                             caption_dropout=0.2)
    result = train_flow_matching({"field": field}, field.velocity, batches, torch.zeros(1, 1, 2), cfg, tmp_path,
                                 progress=False)
    return field, result


def test_resume_continues_exactly(tmp_path):
    straight, straight_result = run(tmp_path / "a", steps=12)
    run(tmp_path / "b", steps=6)                 # "killed" after a checkpoint at step 6 ...
    resumed, resumed_result = run(tmp_path / "b", steps=12)   # ... and resumed from it
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert straight_result["losses"] == resumed_result["losses"]


def test_loss_falls_and_ema_is_saved(tmp_path):
    field, result = run(tmp_path, steps=150, every=50)
    losses = result["losses"]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert state["step"] == 150
    before = [p.clone() for p in field.parameters()]
    load_ema_into({"field": field}, tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, field.parameters()))  # EMA differs from raw weights
    assert not list(tmp_path.glob(".last*"))   # no half-written checkpoint left behind


def test_time_distribution():
    g = torch.Generator().manual_seed(0)
    s = sample_times(20000, FlowMatchingConfig(), g)
    assert 0 < s.min() and s.max() < 1 and abs(float(s.mean()) - 0.5) < 0.01
    shifted = sample_times(20000, FlowMatchingConfig(time_shift=3.0), g)
    assert float(shifted.mean()) > 0.6
