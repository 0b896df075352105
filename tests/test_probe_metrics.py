"""The shipped probe and teacher, and the metrics built on them (needs anima_lib/assets)."""
import shutil

import pytest
import torch

from anima_lib import config, gate, io, metrics, models
from anima_lib.nano_world import probes, teacher
from anima_lib.nano_world.prompts import ATTRIBUTES


@pytest.fixture(scope="module")
def probe():
    return probes.load_probe()


@pytest.fixture(scope="module")
def gate_params(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    return config.load_config("nano", ["gate.n_prompts=24", "gate.seeds_per_prompt=2",
                                       f"run.output_dir={out}/o", f"run.report_dir={out}/r"])


def test_probe_held_out_accuracy(probe):
    accuracy = probes.held_out_accuracy(probe, n=512)
    print("probe held-out accuracy:", {k: round(v, 4) for k, v in accuracy.items()})
    for name in ATTRIBUTES:
        assert accuracy[name] >= 0.98, (name, accuracy[name])
    assert accuracy["style"] >= 0.99
    assert accuracy["clean_on_renders"] >= 0.95 and accuracy["clean_on_degraded"] >= 0.8


def test_metrics_separate_good_from_bad_sets(probe, gate_params):
    gate_set = gate.gate_set(gate_params)
    renders = gate.render_reference(gate_params, gate_set)
    others = gate.render_reference(gate_params, gate_set, stream=gate.NOISE_FLOOR)
    reader = metrics.ProbeReader(probe)
    good = metrics.score_images(reader.read(others), gate_set.attributes, gate_set.image_prompt)
    assert good["alignment"] >= 0.9 and good["alignment_ci"][0] <= good["alignment"] <= good["alignment_ci"][1]
    wrong_prompts = gate_set.attributes[1:] + gate_set.attributes[:1]
    assert metrics.score_images(reader.read(others), wrong_prompts, gate_set.image_prompt)["alignment"] < 0.3
    blurred = probes.blur(others, 2.0)
    assert metrics.score_images(reader.read(blurred), gate_set.attributes, gate_set.image_prompt)["alignment"] < 0.5
    assert metrics.fd_probe(renders, blurred, probe) > 3 * metrics.fd_probe(renders, others, probe)
    same_per_prompt = others[[2 * p for p in gate_set.image_prompt]]   # every seed of a prompt is one image
    collapsed = metrics.score_images(reader.read(same_per_prompt), gate_set.attributes, gate_set.image_prompt)
    assert collapsed["diversity"] < 1e-4 < good["diversity"]


def test_alignment_ranks_teacher_one_step_below_twenty(probe, gate_params):
    components = models.load_components(gate_params)
    gate_set = gate.gate_set(gate_params)
    reader = metrics.ProbeReader(probe)
    scores = {steps: metrics.score_images(reader.read(gate.sample_teacher(components, gate_params, gate_set, steps)),
                                          gate_set.attributes, gate_set.image_prompt) for steps in (1, 20)}
    print("alignment teacher@1", scores[1]["alignment"], "teacher@20", scores[20]["alignment"])
    assert scores[1]["alignment"] < scores[20]["alignment"]


def test_corrupt_shipped_teacher_is_detected_with_a_fix(tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher.SHIPPED_TEACHER, copy)
    teacher.verify_teacher(copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(io.WeightsError, match="sha256 does not match.*00_nano_teacher --set teacher.train=true"):
        teacher.verify_teacher(copy)
    weights.unlink()
    with pytest.raises(io.WeightsError, match="missing; regenerate"):
        teacher.load_teacher(copy)


def test_corrupt_probe_is_detected(tmp_path):
    copy = tmp_path / "probe"
    shutil.copytree(probes.SHIPPED_PROBE, copy)
    (copy / "probe.safetensors").write_bytes(b"not weights")
    with pytest.raises(io.WeightsError, match="sha256 does not match"):
        probes.load_probe(copy)


def test_paired_difference_sees_a_small_shift_that_two_rows_intervals_cannot():
    """Two rows read on the same prompts and noise share most of their variation: a 0.05 shift hides inside each row's
    own interval but the paired interval excludes zero; the same rows without a shift give an interval around 0."""
    generator = torch.Generator().manual_seed(0)
    image_prompt = [p for p in range(128) for _ in range(4)]
    prompt_difficulty = torch.rand(128, generator=generator)[image_prompt]
    shared = torch.rand(512, generator=generator)
    base = (shared < prompt_difficulty).float()
    better = base.clone()
    flip = torch.nonzero(base == 0).flatten()[:26]   # ~0.05 of the images turn right
    better[flip] = 1.0
    prompts = torch.tensor(image_prompt)
    own = metrics.bootstrap_interval(metrics.per_prompt_means(base, prompts))
    assert own[1] - own[0] > 0.05                               # one row's own interval is wider than the shift
    shifted = metrics.paired_difference(better, base, image_prompt)
    assert shifted["difference"] == pytest.approx(26 / 512)
    assert 0 < shifted["ci"][0] < shifted["difference"] < shifted["ci"][1]
    same = metrics.paired_difference(base, base.clone(), image_prompt)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="one value per gate image"):
        metrics.paired_difference(base[:10], base[:10], image_prompt)


def test_interval_reading_names_met_missed_and_undecided():
    assert metrics.interval_reading({"ci": [-0.01, 0.03]}, -0.02) == "met"
    assert metrics.interval_reading({"ci": [-0.07, -0.03]}, -0.02) == "missed"
    assert metrics.interval_reading({"ci": [-0.07, 0.02]}, -0.02) == "undecided"
    assert metrics.interval_reading({"ci": [-0.005, 0.008]}, -0.01, 0.01) == "met"       # two-sided: within ±0.01
    assert metrics.interval_reading({"ci": [0.012, 0.03]}, -0.01, 0.01) == "missed"      # better by more than 0.01
    assert metrics.interval_reading({"ci": [-0.012, 0.027]}, -0.01, 0.01) == "undecided"
