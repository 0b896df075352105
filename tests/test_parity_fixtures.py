"""Parity fixtures: written, replayed from the stored inputs at the gate, and a corrupted fixture is caught."""
import copy

import torch
from safetensors.torch import load_file, save_file

from anima_lib import config, models, parity_fixtures
from anima_lib.nano_world.prompts import sample_creatures, vocabulary
from anima_lib.quant import ledger, packed


def test_fixtures_replay_at_the_gate_and_catch_corruption(tmp_path):
    torch.manual_seed(0)
    components = models.build_nano(vocabulary(), seed=0)
    student, _, _ = packed.quantize_model(copy.deepcopy(components.transformer).float(), ledger.DIT_POLICY,
                                          dtype=torch.float32)
    params = config.load_config("smoke", check_paths=False)
    prompts = [c.prompt() for c in sample_creatures(3, seed=5)]
    index = parity_fixtures.write(tmp_path, components, student, prompts, params)
    assert {"text.safetensors", "dit.safetensors", "sampler_1.safetensors", "sampler_4.safetensors",
            "weights.safetensors"} <= set(index["files"])
    assert index["files"]["sampler_4.safetensors"]["step3.x0"]["shape"][0] == 3
    results = parity_fixtures.replay(tmp_path, components, student)
    assert len(results) > 10 and min(results.values()) >= parity_fixtures.WORST_ROW_COSINE_GATE, results
    stored = load_file(tmp_path / "dit.safetensors")
    stored["velocity"][0, :, 0, 2, 3] *= -1  # one pixel of one image wrong: the worst row catches it
    save_file(stored, tmp_path / "dit.safetensors")
    assert parity_fixtures.replay(tmp_path, components, student)["dit.velocity"] < parity_fixtures.WORST_ROW_COSINE_GATE
