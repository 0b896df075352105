"""LoRAs and De-Turbo: files diffusers and ComfyUI load, key and rank checks, style-folder validation, dropping an
adapter is bit-exact, SVD init recovers a low-rank difference, training against a teacher's velocity works, the
survival verdict."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anima_lib import checks, config, flow_training, lora, lora_survival, models
from anima_lib.distill import deturbo
from anima_lib.nano_world.prompts import vocabulary

PROMPT = "a big green cross creature with one eye on the right , sky background"


@pytest.fixture(scope="module")
def nano():
    components = models.build_nano(vocabulary(), seed=5)
    return components


def _random_lora(transformer, rank=4, alpha=8.0, seed=0, std=0.05, modules=None):
    g = torch.Generator().manual_seed(seed)
    linears = lora.target_linears(transformer)
    names = modules or sorted(linears)
    down = {n: torch.randn(rank, linears[n].in_features, generator=g) * std for n in names}
    up = {n: torch.randn(linears[n].out_features, rank, generator=g) * std for n in names}
    return lora.LoraWeights(down, up, rank, alpha)


def _inputs(components, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *components.latent_shape(32), generator=g)
    sigma = torch.linspace(0.9, 0.1, n)
    context = components.encode_prompts([PROMPT] * n)
    return x, sigma, context


def _velocity(transformer, inputs):
    with torch.no_grad():
        return models.transformer_velocity(transformer, *inputs)


def test_saved_lora_loads_through_diffusers_and_comfy_keys_agree(nano, tmp_path):
    transformer = nano.transformer
    weights = _random_lora(transformer, rank=4, alpha=8.0)  # alpha != rank: the scale must travel with the file
    lora.save_lora(weights, tmp_path / "style", {"kind": "test"})
    inputs = _inputs(nano)
    expected = _velocity(lora.fused(transformer, [(weights, 1.0)]), inputs)
    loaded = copy.deepcopy(transformer)
    lora.load_with_diffusers(loaded, tmp_path / "style", adapter_name="style")  # AnimaLoraLoaderMixin.load_lora_weights
    assert torch.allclose(_velocity(loaded, inputs), expected, atol=1e-5)
    assert not torch.allclose(expected, _velocity(transformer, inputs), atol=1e-3)  # the LoRA does something
    from_comfy = lora.read_lora(tmp_path / "style" / lora.COMFY_FILE)  # diffusers' converter reads the ComfyUI keys
    assert all(k.startswith("diffusion_model.blocks.") for k in
               __import__("safetensors.torch").torch.load_file(tmp_path / "style" / lora.COMFY_FILE))
    for name in weights.down:
        assert torch.allclose(from_comfy.delta(name), weights.delta(name), atol=1e-6)
    manifest = lora.read_manifest(tmp_path / "style")
    assert manifest["rank"] == 4 and manifest["alpha"] == 8.0 and manifest["lora_sha256"] == weights.digest()


def test_a_corrupted_lora_folder_is_refused(nano, tmp_path):
    lora.save_lora(_random_lora(nano.transformer), tmp_path / "l", {})
    path = tmp_path / "l" / lora.LORA_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(lora.LoraError, match="sha256"):
        lora.read_lora(tmp_path / "l")


def test_unmatched_lora_keys_are_named(nano, tmp_path):
    weights = _random_lora(nano.transformer, modules=["transformer_blocks.0.attn1.to_q"])
    for extra in ("transformer_blocks.99.attn1.to_q", "blocks.0.mystery"):
        weights.down[extra] = weights.down["transformer_blocks.0.attn1.to_q"].clone()
        weights.up[extra] = weights.up["transformer_blocks.0.attn1.to_q"].clone()
    with pytest.raises(lora.LoraError, match=r"2 LoRA modules do not match.*blocks.0.mystery.*transformer_blocks.99"):
        lora.fused(nano.transformer, [(weights, 1.0)])
    lora.save_lora(weights, tmp_path / "bad", {})
    with pytest.raises(lora.LoraError, match="transformer_blocks.99.attn1.to_q"):
        lora.load_with_diffusers(copy.deepcopy(nano.transformer), tmp_path / "bad", adapter_name="x")


def test_rank_and_alpha_are_validated(nano):
    with pytest.raises(lora.LoraError, match="narrowest target layer has 64 features"):
        lora.add_adapter(copy.deepcopy(nano.transformer), rank=65, alpha=65)
    with pytest.raises(config.ConfigError, match="lora.rank = 0"):
        config.load_config("nano", ["lora.rank=0"])
    with pytest.raises(config.ConfigError, match="deturbo.alpha = -1"):
        config.load_config("nano", ["deturbo.alpha=-1"])
    with pytest.raises(config.ConfigError, match="lora.strengths"):
        config.load_config("nano", ["lora.strengths=[]"])
    with pytest.raises(config.ConfigError, match="lora.style_folder"):
        config.load_config("nano", ["lora.style_folder=/no/such/folder"])


def test_dropping_an_adapter_gives_the_model_back_bit_exactly(nano, tmp_path):
    student = nano.transformer
    digest = models.weights_digest(student)
    inputs = _inputs(nano)
    plain = _velocity(student, inputs)
    lora.save_lora(_random_lora(student, seed=3), tmp_path / "a", {})
    with_adapter = copy.deepcopy(student)
    lora.load_with_diffusers(with_adapter, tmp_path / "a", adapter_name="deturbo")
    assert not torch.equal(_velocity(with_adapter, inputs), plain)
    with_adapter.delete_adapters("deturbo")
    assert torch.equal(_velocity(with_adapter, inputs), plain)
    fused = lora.fused(student, [(lora.read_lora(tmp_path / "a"), 1.0)])
    assert models.weights_digest(student) == digest and models.weights_digest(fused) != digest  # fused() copies


def test_svd_init_recovers_a_low_rank_difference(nano):
    student = nano.transformer
    true_difference = _random_lora(student, rank=3, alpha=3.0, seed=7)
    teacher = lora.fused(student, [(true_difference, 1.0)])
    recovered = deturbo.svd_init(teacher, student, rank=6, alpha=12.0)
    inputs = _inputs(nano)
    assert torch.allclose(_velocity(lora.fused(student, [(recovered, 1.0)]), inputs), _velocity(teacher, inputs), atol=1e-4)
    truncated = deturbo.svd_init(teacher, student, rank=1, alpha=1.0)  # rank 1 < 3: only part of the difference
    err_full = (_velocity(lora.fused(student, [(truncated, 1.0)]), inputs) - _velocity(teacher, inputs)).norm()
    assert err_full > 1e-3


def test_lora_training_against_a_teacher_velocity_closes_the_gap(nano, tmp_path):
    """De-Turbo's objective on a known answer: the 'teacher' is the student plus a rank-2 LoRA on two layers; a
    zero-initialised rank-2 adapter trained on v_teacher must remove most of the velocity error."""
    torch.manual_seed(0)
    student = nano.transformer
    modules = ["transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn1.to_out.0"]
    teacher = lora.fused(student, [(_random_lora(student, rank=2, alpha=2.0, seed=11, std=0.3, modules=modules), 1.0)])
    x0 = torch.randn(64, *nano.latent_shape(32), generator=torch.Generator().manual_seed(1))
    context = nano.encode_prompts([PROMPT]).expand(64, -1, -1)
    cfg = flow_training.FlowMatchingConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, ema_decay=0.9,
                                           caption_dropout=0.0, checkpoint_every=75)

    def batches(step, generator):
        pick = torch.randint(64, (16,), generator=generator)
        return x0[pick], context[pick]

    teacher_fn = lambda x, s, c: models.transformer_velocity(teacher, x, s, c)  # noqa: E731
    learned, result = lora.train_lora(student, batches, context[:1], cfg, rank=2, alpha=2.0, folder=tmp_path / "a",
                                      target_fn=teacher_fn, progress=False)
    errors = deturbo.velocity_error_by_time({"before": lambda x, s, c: models.transformer_velocity(student, x, s, c),
                                             "after": lambda x, s, c: models.transformer_velocity(
                                                 lora.fused(student, [(learned, 1.0)]), x, s, c)},
                                            teacher_fn, x0[:16], context[:16], context[:1], buckets=3)
    before, after = sum(errors["before"]) / 3, sum(errors["after"]) / 3
    assert after < 0.5 * before, (before, after)
    assert result["step"] == 150 and (tmp_path / "a" / "checkpoints" / "last" / "state.json").is_file()
    # the same folder with other settings is refused, not mixed in
    cfg.lr = 1e-2
    with pytest.raises(ValueError, match="other settings.*lr"):
        lora.train_lora(student, batches, context[:1], cfg, rank=2, alpha=2.0, folder=tmp_path / "a",
                        target_fn=teacher_fn, progress=False)


def _write_image(path, size, colour=(200, 40, 40)):
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)


def test_style_folder_problems_are_listed_together(nano, tmp_path):
    folder = tmp_path / "style"
    folder.mkdir()
    _write_image(folder / "good.png", 32)
    (folder / "good.txt").write_text(PROMPT)
    _write_image(folder / "no_caption.png", 32)
    _write_image(folder / "too_big.png", 48)
    (folder / "too_big.txt").write_text(PROMPT)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "broken.txt").write_text(PROMPT)
    _write_image(folder / "odd_words.png", 32)
    (folder / "odd_words.txt").write_text("a fluffy dragon")
    (folder / "orphan.txt").write_text(PROMPT)
    with pytest.raises(lora_survival.StyleDataError) as info:
        lora_survival.load_style_folder(folder, 32, lora_survival.nano_caption_check(nano))
    message = str(info.value)
    for expected in ("broken.png: unreadable image", "no_caption.png: missing caption no_caption.txt",
                     "too_big.png: size 48x48, expected 32x32", "odd_words.txt: words outside the nano vocabulary "
                     "['dragon', 'fluffy']", "orphan.txt: caption without an image", "5 problem(s)"):
        assert expected in message, message
    assert "good.png" not in message


def test_nano_style_folder_is_valid_and_deterministic(nano, tmp_path):
    folder = lora_survival.write_nano_style_folder(tmp_path / "s", n_images=6, seed=1)
    images, captions = lora_survival.load_style_folder(folder, 32, lora_survival.nano_caption_check(nano))
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8 and captions[0] == captions[1]
    again = lora_survival.write_nano_style_folder(tmp_path / "t", n_images=6, seed=1)
    assert lora_survival.folder_digest(folder) == lora_survival.folder_digest(again)
    from anima_lib.nano_world.prompts import sample_creatures
    from anima_lib.nano_world.renderer import render_batch
    creature = sample_creatures(3, seed=1)[0]
    assert captions[0] == creature.prompt()
    expected = (render_batch([creature], [10_000], 32, style=True) * 255).round().to(torch.uint8)
    assert torch.equal(images[:1], expected)  # the PNGs hold exactly the renderer's style-mode pixels


def test_survival_table_and_verdict():
    rows = {"teacher+lora@20": {"style_score": 0.9, "style_stripes": 0.2},
            "student@1": {"attribute_alignment": 0.4, "diversity": 10.0},
            "student@4": {"attribute_alignment": 0.5, "diversity": 10.0}}
    values = {"teacher": (0.6, 0.85), "deturbo": (0.8, 0.88), "student": (0.9, 0.9)}
    for way, (s1, s4) in values.items():
        rows[f"{lora_survival.WAY_ROWS[way]}@1"] = {"style_score": s1, "attribute_alignment": 0.39, "diversity": 9.0,
                                            "clean_rate": 0.1, "fd_probe_vs_reference": 50.0, "style_stripes": 0.1}
        rows[f"{lora_survival.WAY_ROWS[way]}@4"] = {"style_score": s4, "attribute_alignment": 0.49, "diversity": 9.5,
                                            "clean_rate": 0.2, "fd_probe_vs_reference": 40.0, "style_stripes": 0.18}
    rows["student+lora_student@1"].update(diversity=4.0, fd_probe_vs_reference=200.0)  # collapse
    table = lora_survival.survival_table(rows, "teacher+lora@20", list(values), [1, 4])
    assert table["deturbo@1"]["survives"] and table["deturbo@4"]["survives"]
    assert not table["teacher@1"]["survives"] and table["teacher@4"]["survives"]  # 0.6/0.9 = 0.67 < 0.8
    assert not table["student@1"]["survives"]
    verdict = lora_survival.survival_verdict(table, list(values), [1, 4])
    assert "deturbo: survives at 1/4 steps (@1/4: style x0.89/0.98 (graded x0.50/0.90), content x0.97/0.98" in verdict
    assert table["deturbo@1"]["graded_style_ratio"] == pytest.approx(0.5)   # the stripes, not the saturating probe
    assert "teacher: survives at 4 steps" in verdict
    assert "direct training: diversity drops; its samples sit x2.7 farther from the styled reference" in verdict
    assert "De-Turbo (the control) carries more style than stacking the teacher's LoRA (mean x0.93 vs x0.81)" in verdict
    close = {k: {**v, "style_ratio": table[f"teacher@{k.split('@')[1]}"]["style_ratio"]} if k.startswith("deturbo") else v
             for k, v in table.items()}
    assert "De-Turbo (the control) is no better than stacking" in lora_survival.survival_verdict(close, list(values), [1, 4])


def test_judge_of_06_checks_equal_steps_and_a_real_reference():
    rows = {"teacher@20": {"style_score": 0.01, "attribute_alignment": 0.80},
            "teacher+lora@20": {"style_score": 0.85, "attribute_alignment": 0.78}}
    good = lora_survival.judge(rows, "teacher+lora@20", "teacher@20", {"teacher": 1500, "deturbo": 1500}, 1500)
    assert checks.all_passed(good) and len(good) == 3
    assert "every LoRA trained its 1500 steps (teacher 1500, deturbo 1500)" in good[0].name
    short = lora_survival.judge(rows, "teacher+lora@20", "teacher@20", {"teacher": 289, "deturbo": 1500}, 1500)
    assert [c.passed for c in short] == [False, True, True]
    weak = dict(rows, **{"teacher+lora@20": {"style_score": 0.17, "attribute_alignment": 0.75}})  # 0.75/0.80 < 0.95
    result = lora_survival.judge(weak, "teacher+lora@20", "teacher@20", {"teacher": 1500}, 1500)
    assert [c.passed for c in result] == [True, False, False]
    assert "style_score 0.170 (≥ 0.8)" in result[1].name and "x0.938 of teacher@20 (≥ 0.95)" in result[2].name
    at_threshold = {"teacher@20": {"style_score": 0.0, "attribute_alignment": 1.0},
                    "teacher+lora@20": {"style_score": lora_survival.REFERENCE_STYLE_MIN["nano"],
                                        "attribute_alignment": lora_survival.REFERENCE_CONTENT_RATIO}}
    assert checks.all_passed(lora_survival.judge(at_threshold, "teacher+lora@20", "teacher@20", {"t": 1}, 1))
    real = {"teacher@20": {"style_clip": 0.30, "clip_score": 30.0}, "teacher+lora@20": {"style_clip": 0.25, "clip_score": 30.0}}
    assert not lora_survival.judge(real, "teacher+lora@20", "teacher@20", {"t": 1}, 1, kind="real")[1].passed


def test_deturbo_folder_is_keyed_by_what_the_adapter_learns(nano, tmp_path):
    student = lora.fused(nano.transformer, [(_random_lora(nano.transformer, seed=2), 1.0)])
    base = config.load_config("nano", [f"run.output_dir={tmp_path}"])
    folder = deturbo.deturbo_folder(base, nano.transformer, student)
    assert folder == deturbo.deturbo_folder(config.load_config("nano", [f"run.output_dir={tmp_path}",
                                                                          "deturbo.minutes=1"]), nano.transformer, student)
    assert folder != deturbo.deturbo_folder(config.load_config("nano", [f"run.output_dir={tmp_path}", "deturbo.rank=16"]),
                                            nano.transformer, student)
    assert folder != deturbo.deturbo_folder(base, nano.transformer, nano.transformer)  # another student
    with pytest.raises(deturbo.DeturboError, match="run notebook 03_deturbo first"):
        deturbo.load_deturbo(base, nano, student)


def test_a_freshly_trained_style_lora_is_returned_and_then_found_finished(nano, tmp_path):
    params = config.load_config("nano", [f"run.output_dir={tmp_path}", "lora.steps=2", "lora.style_images=4",
                                         "lora.batch_size=2", "lora.rank=2", "lora.alpha=2"])
    trained, manifest = lora_survival.train_style_lora(params, nano, "teacher", nano.transformer, progress=False)
    assert isinstance(trained, lora.LoraWeights) and manifest["steps"] == 2 and manifest["finished"]
    found, again = lora_survival.train_style_lora(params, nano, "teacher", nano.transformer, progress=False)
    assert found.digest() == trained.digest() and again == manifest
