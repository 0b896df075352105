"""gate.reuse_samples: a teacher-sampler row is sampled once per run and read back bit-identical; a changed file, a
different stream or a different DiT is never read as the stored row."""
import copy
import dataclasses

import pytest
import torch

from anima_lib import config, gate, models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    params = config.load_config("smoke", [f"run.output_dir={out}", "gate.reuse_samples=true", "gate.n_prompts=2",
                                          "gate.seeds_per_prompt=1"])
    return params, models.load_components(params), gate.gate_set(params)


def test_a_row_is_sampled_once_and_read_back_identical(setup, monkeypatch):
    params, components, gate_set = setup
    first = gate.sample_teacher(components, params, gate_set, 2)
    stored = list(gate.samples_folder(params).glob("teacher-*.safetensors"))
    assert len(stored) == 1
    monkeypatch.setattr(gate, "_sample_teacher", lambda *a, **k: pytest.fail("sampled again"))
    assert torch.equal(gate.sample_teacher(components, params, gate_set, 2), first)


def test_a_changed_file_is_resampled_not_read(setup):
    params, components, gate_set = setup
    first = gate.sample_teacher(components, params, gate_set, 3)
    [path] = [p for p in gate.samples_folder(params).glob("teacher-*.safetensors")
              if '"steps": 3' in p.with_suffix(".json").read_text()]
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)     # same size, other bytes: the sha256 no longer matches
    assert torch.equal(gate.sample_teacher(components, params, gate_set, 3), first)


def test_stream_and_weights_are_part_of_the_key(setup):
    params, components, gate_set = setup
    main = gate.sample_teacher(components, params, gate_set, 1)
    floor = gate.sample_teacher(components, params, gate_set, 1, stream=gate.NOISE_FLOOR)
    assert not torch.equal(main, floor)
    other = copy.deepcopy(components.transformer)
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    changed = gate.sample_teacher(dataclasses.replace(components, transformer=other), params, gate_set, 1)
    assert not torch.equal(main, changed)


def test_off_by_default_writes_nothing(tmp_path):
    params = config.load_config("smoke", [f"run.output_dir={tmp_path}", "gate.reuse_samples=false",
                                          "gate.n_prompts=1", "gate.seeds_per_prompt=1"])
    components = models.load_components(params)
    gate.sample_teacher(components, params, gate.gate_set(params), 1)
    assert not gate.samples_folder(params).exists()


def test_teacher_speed_is_timed_on_fresh_samples_not_a_read_back_row(setup, monkeypatch):
    params, components, gate_set = setup
    gate.sample_teacher(components, params, gate_set, 2)   # stored: the next call reads it back in no time
    sampled = []
    real = gate._sample_teacher
    monkeypatch.setattr(gate, "_sample_teacher", lambda c, p, g, *a: sampled.append(len(g.image_prompt)) or real(c, p, g, *a))
    speed = gate.teacher_images_per_s(components, params, gate_set, 2, batch_size=1)
    assert sampled == [1] and 0 < speed < float("inf")   # one fresh batch of batch_size images, timed


def test_a_larger_set_extends_the_stored_row_and_samples_only_the_rest(setup, monkeypatch):
    params, components, gate_set = setup
    larger = gate.gate_set(params, n_prompts=3, seeds_per_prompt=1)
    small_row = gate.sample_teacher(components, params, gate_set, 2)
    whole = gate._sample_teacher(components, params, larger, 2, gate.MAIN, 128)   # the larger set in one go
    sampled = []
    real = gate._sample_teacher
    monkeypatch.setattr(gate, "_sample_teacher", lambda c, p, g, *a: sampled.append(len(g.image_prompt)) or real(c, p, g, *a))
    extended = gate.sample_teacher(components, params, larger, 2, extends=gate_set)
    assert sampled == [1]                                    # the 2 stored images were read back, 1 sampled
    assert torch.equal(extended[:2], small_row)
    torch.testing.assert_close(extended, whole, rtol=0, atol=1e-5)   # same prompts and noise per image
    assert torch.equal(gate.sample_teacher(components, params, larger, 2), extended)   # stored under its own key


def test_a_set_that_does_not_begin_with_the_other_is_refused(setup):
    params, components, gate_set = setup
    other_seeds = gate.gate_set(params, n_prompts=3, seeds_per_prompt=2)      # image order differs after image 0
    with pytest.raises(ValueError, match="does not begin with"):
        gate.sample_teacher(components, params, other_seeds, 2, extends=gate_set)
