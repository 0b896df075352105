"""One gate harness, two evaluation worlds (DESIGN §7; issue 16): a real preset reads its prompt files and scores with
readers from local weights, required before any compute; the nano world computes exactly what it always did.

Real-world readers are feature-extractor callables, so here small deterministic stand-ins play Inception and CLIP
(colour statistics): a red image "matches" a prompt saying red.
"""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from anima_lib import checks as checks_mod
from anima_lib import config, gate, metrics, worlds
from anima_lib.config import ConfigError

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0)}


# --- stand-in readers --------------------------------------------------------------------------------------------------

def fake_inception(images):
    """[N, 6] float64: mean and std of each colour channel (a tiny, deterministic 'Inception')."""
    x = metrics.as_float(images).flatten(2)
    return torch.cat([x.mean(-1), x.std(-1)], 1).double()


def fake_clip_image(images):
    return torch.nn.functional.normalize(metrics.as_float(images).mean((2, 3)), dim=-1)


def fake_clip_text(prompts):
    vectors = [sum((torch.tensor(rgb) for word, rgb in COLORS.items() if word in p.split()), torch.full((3,), 0.1))
               for p in prompts]
    return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


def fake_readers():
    return worlds.RealReaders(inception=fake_inception, clip_image=fake_clip_image, clip_text=fake_clip_text,
                              names={"fid": "FID: stand-in colour statistics", "clip": "CLIP: stand-in colours"})


# --- a small real preset -----------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EVAL_ROWS = [{"id": f"e{i}", "category": "colors" if i < 4 else "position", "prompt": f"a {c} ball number {i}"}
             for i, c in enumerate(["red", "green", "blue", "red", "green", "blue"])]


@pytest.fixture
def real_files(tmp_path):
    model = tmp_path / "Anima-Base-v1.0-Diffusers"
    model.mkdir()
    weights = {name: tmp_path / name for name in (config.INCEPTION_WEIGHTS_FILE, config.CLIP_CHECKPOINT_FILE)}
    for path in weights.values():
        path.write_bytes(b"stand-in")  # config checks presence; these tests never load them
    style = tmp_path / "style"
    style.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 24), (230, 20 + i, 20)).save(style / f"s{i}.png")  # any size: centre-cropped
    return {"model": model, "train": write_jsonl(tmp_path / "train.jsonl", [{"id": "t0", "prompt": "a yellow kite"}]),
            "eval": write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS), "style": style, **weights}


def real_overrides(tmp_path, files, **extra):
    values = {"run.output_dir": f"{tmp_path}/out", "run.report_dir": f"{tmp_path}/rep", "run.device": "cpu",
              "model.diffusers_dir": str(files["model"]), "cache.prompts_file": str(files["train"]),
              "gate.prompts_file": [str(files["eval"])], "gate.n_prompts": 6, "gate.seeds_per_prompt": 3,
              "gate.image_size": 16, "gate.inception_weights": str(files[config.INCEPTION_WEIGHTS_FILE]),
              "gate.clip_checkpoint": str(files[config.CLIP_CHECKPOINT_FILE]), "lora.style_folder": str(files["style"])}
    values.update(extra)
    return values  # None overrides the preset with null


@pytest.fixture
def real_params(tmp_path, real_files):
    return config.load_config("anima-2b", real_overrides(tmp_path, real_files))


# --- config: a real preset needs its world, nano presets do not ---------------------------------------------------------

@pytest.mark.parametrize("missing, message", [
    ("cache.prompts_file", r"cache\.prompts_file is required with model\.preset = 'anima-2b'.*nano creature prompts"),
    ("gate.prompts_file", r"gate\.prompts_file is required with model\.preset = 'anima-2b'"),
])
def test_real_preset_requires_training_and_evaluation_prompts(tmp_path, real_files, missing, message):
    overrides = real_overrides(tmp_path, real_files)
    overrides[missing] = None
    with pytest.raises(ConfigError, match=message):
        config.load_config("anima-2b", overrides)


def test_missing_metric_weights_are_a_parameter_error_naming_keys_and_files(tmp_path, real_files):
    overrides = real_overrides(tmp_path, real_files, **{"gate.inception_weights": None, "gate.clip_checkpoint": None})
    with pytest.raises(ConfigError) as error:
        config.load_config("anima-2b", overrides)
    message = str(error.value)
    for expected in ("gate.inception_weights", "weights-inception-2015-12-05-6726825d.pth", "gate.clip_checkpoint",
                     "open_clip", "open_clip_pytorch_model.bin", "nothing is downloaded"):
        assert expected in message, message
    overrides = real_overrides(tmp_path, real_files, **{"gate.clip_checkpoint": None})
    with pytest.raises(ConfigError, match=r"set gate\.clip_checkpoint \(an open_clip checkpoint"):
        config.load_config("anima-2b", overrides)
    # a path that is not there names the file it should be
    overrides = real_overrides(tmp_path, real_files, **{"gate.inception_weights": str(tmp_path / "nope.pth")})
    with pytest.raises(ConfigError, match=r"gate\.inception_weights = .*no such file \(expected a local "
                                          r"weights-inception-2015-12-05-6726825d\.pth"):
        config.load_config("anima-2b", overrides)
    # only when paths are checked: unit tests of other things load a real preset without any of them
    p = config.load_config("anima-2b", overrides | {"gate.inception_weights": None, "cache.prompts_file": None},
                           check_paths=False)
    assert p.gate.inception_weights is None


def test_gate_prompts_file_is_one_file_or_a_list_and_must_exist(tmp_path, real_files):
    overrides = real_overrides(tmp_path, real_files)
    one = config.load_config("anima-2b", overrides | {"gate.prompts_file": str(real_files["eval"])})
    listed = config.load_config("anima-2b", overrides)
    assert config.gate_prompt_files(one) == config.gate_prompt_files(listed) == [real_files["eval"]]
    with pytest.raises(ConfigError, match=r"gate\.prompts_file: .*absent\.jsonl.*no such file"):
        config.load_config("anima-2b", overrides | {"gate.prompts_file": [str(tmp_path / "absent.jsonl")]})
    with pytest.raises(ConfigError, match="must not list a file twice"):
        config.load_config("anima-2b", overrides | {"gate.prompts_file": [str(real_files["eval"])] * 2})
    with pytest.raises(ConfigError, match=r"gate\.n_prompts = 7 but gate\.prompts_file holds 6 prompts"):
        config.load_config("anima-2b", overrides | {"gate.n_prompts": 7})


@pytest.mark.parametrize("preset", ["nano", "smoke"])
def test_nano_presets_need_none_of_it(preset):
    p = config.load_config(preset)
    assert p.gate.prompts_file is None and p.cache.prompts_file is None and p.gate.inception_weights is None
    assert worlds.world_kind(p) == worlds.NANO


# --- the real gate set: prompt files, never creatures -------------------------------------------------------------------

def test_real_gate_set_reads_the_files_and_never_draws_creatures(real_params, monkeypatch):
    from anima_lib.nano_world import prompts
    monkeypatch.setattr(prompts, "sample_creatures", lambda *a, **k: pytest.fail("drew nano creatures"))
    g = gate.gate_set(real_params)
    assert g.prompts == [r["prompt"] for r in EVAL_ROWS] and g.ids == [r["id"] for r in EVAL_ROWS]
    assert g.categories == ["colors"] * 4 + ["position"] * 2 and g.attributes is None
    assert g.image_prompt == [i for i in range(6) for _ in range(3)] and g.image_seed == [0, 1, 2] * 6
    real_params.gate.n_prompts = 3  # fewer than the files hold: evenly spaced, in file order
    assert gate.gate_set(real_params).ids == ["e0", "e2", "e4"]


def test_real_gate_set_refuses_overlap_negatives_and_repeated_ids(real_params, real_files, tmp_path):
    write_jsonl(real_files["train"], [{"id": "t0", "prompt": "A  red ball number 0."}])  # same prompt, other spelling
    with pytest.raises(ConfigError, match=r"share 1 prompt\(s\) \(e0 = t0\).*disjoint"):
        gate.gate_set(real_params)
    write_jsonl(real_files["train"], [{"id": "t0", "prompt": "a yellow kite"}])
    write_jsonl(real_files["eval"], EVAL_ROWS[:5] + [{**EVAL_ROWS[5], "negative": "blurry"}])
    with pytest.raises(ConfigError, match=r"eval\.jsonl:6: id 'e5' has a 'negative'"):
        gate.gate_set(real_params)
    real_files["eval"].write_text(json.dumps(EVAL_ROWS[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"gate\.prompts_file: .*eval\.jsonl:2: not JSON"):
        gate.gate_set(real_params)
    write_jsonl(real_files["eval"], EVAL_ROWS)
    real_params.gate.prompts_file = [str(real_files["eval"]), str(write_jsonl(tmp_path / "more.jsonl", EVAL_ROWS[:1]))]
    with pytest.raises(ConfigError, match=r"id 'e0' is in .*eval\.jsonl and in .*more\.jsonl"):
        gate.gate_set(real_params)


# --- real-world scoring with stand-in readers ---------------------------------------------------------------------------

def colour_images(g, seed, colour_of=lambda prompt: prompt.split()[1], noise=0.15, size=16):
    """One image per (prompt, seed): the prompt's colour plus seeded noise."""
    out = []
    for p, s in zip(g.image_prompt, g.image_seed):
        base = torch.tensor(COLORS[colour_of(g.prompts[p])]).view(3, 1, 1).expand(3, size, size)
        noise_t = torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed * 1000 + p * 10 + s))
        out.append((base + noise * noise_t).clamp(0, 1))
    return torch.stack(out)


def test_real_world_rows_fid_clip_diversity_and_noise_floor(real_params):
    world = worlds.load_world(real_params, readers=fake_readers())
    assert isinstance(world, worlds.RealWorld) and world.kind == worlds.REAL
    g = world.gate
    shift = {"red": "green", "green": "blue", "blue": "red"}
    reference = colour_images(g, seed=1)
    samples = {"teacher@20": reference, "teacher@1": colour_images(g, seed=2, noise=0.45),
               "student@1": colour_images(g, seed=3),
               "student_lcm@1": colour_images(g, seed=4, colour_of=lambda p: "red"),     # one colour for all
               "student_scm@1": colour_images(g, seed=4, colour_of=lambda p: shift[p.split()[1]]),  # wrong colours
               "student@4": reference[[3 * p for p in g.image_prompt]]}  # every seed of a prompt: one image
    noise_floor = colour_images(g, seed=9)
    rows = world.score_rows({k: world.keep(v) for k, v in samples.items()}, "teacher@20", world.keep(noise_floor))
    floor = rows["teacher@20"]["fid_vs_teacher"]
    # the reader is what the rows use: FID of the row's features to the other-seed reference's
    assert floor == pytest.approx(metrics.fid_from_features(fake_inception(world.keep(noise_floor)),
                                                            fake_inception(world.keep(reference))))
    assert rows["student@1"]["fid_vs_teacher"] < 3 * floor + 1e-3
    assert rows["teacher@1"]["fid_vs_teacher"] > 3 * floor and rows["student_lcm@1"]["fid_vs_teacher"] > 3 * floor
    # FID is blind to which prompt got which colour (the colour mix is right); the CLIP score is not
    assert rows["student_scm@1"]["fid_vs_teacher"] < 3 * floor + 1e-3
    assert rows["student@1"]["clip_score"] > rows["student_scm@1"]["clip_score"] + 20
    assert rows["student@4"]["diversity_clip"] < 1e-6 < rows["student@1"]["diversity_clip"]
    assert rows["teacher@20"]["rmse_to_reference"] == 0 and rows["student@1"]["rmse_to_reference"] > 0
    for row in rows.values():
        assert row["n_images"] == 18 and set(row) >= {"clip_score_colors", "clip_score_position", "clip_score_ci",
                                                      "diversity_clip_ci"}
        assert row["clip_score_ci"][0] <= row["clip_score"] <= row["clip_score_ci"][1]
        assert "style_clip" not in row and "alignment" not in row and "fd_probe" not in row
    # verdict: the real checks read these names; a collapsed or off-prompt student fails them
    checks, verdict, headline = world.verdict(rows, {"teacher@20": 1.0, "student@1": 40.0}, "teacher@20")
    checks = checks_mod.as_record(checks)
    assert any(k.startswith("rCM beats student_lcm at 1 step") and ok for k, ok in checks.items())
    failed = [k for k, ok in checks.items() if not ok]  # FID alone cannot tell rCM from the wrong-colour ablation
    assert len(failed) == 1 and failed[0].startswith("rCM beats student_scm at 1 step") and "FAILED" in verdict
    assert any(k.startswith("student@4 fid_vs_teacher") for k in checks)
    assert "noise floor fid_vs_teacher" in verdict and headline["teacher@20.fid_vs_teacher"] == floor
    described = world.describe()
    assert described["world"] == "real" and described["readers"]["fid"].startswith("FID: stand-in")
    json.dumps(described)  # it goes into metrics.json


def test_kept_samples_are_png_bytes_and_score_like_floats(real_params):
    world = worlds.load_world(real_params, readers=fake_readers())
    images = colour_images(world.gate, seed=5)
    kept = world.keep(images)
    assert kept.dtype == torch.uint8 and torch.equal(kept, (images * 255).round().byte())
    a = world.score_rows({"teacher@20": kept}, "teacher@20", world.keep(colour_images(world.gate, seed=6)))
    b = world.score_rows({"teacher@20": metrics.as_float(kept)}, "teacher@20",
                         metrics.as_float(world.keep(colour_images(world.gate, seed=6))))
    assert a["teacher@20"]["clip_score"] == pytest.approx(b["teacher@20"]["clip_score"], rel=1e-5)
    assert a["teacher@20"]["fid_vs_teacher"] == pytest.approx(b["teacher@20"]["fid_vs_teacher"], rel=1e-4, abs=1e-6)


def test_style_similarity_to_the_style_folder(real_params):
    world = worlds.load_world(real_params, readers=fake_readers())
    g = world.gate
    red = colour_images(g, seed=1, colour_of=lambda p: "red")
    blue = colour_images(g, seed=1, colour_of=lambda p: "blue")
    rows = world.score_rows({"teacher+lora@20": red, "student+lora_deturbo@1": blue}, "teacher+lora@20", red,
                            style=True)
    assert rows["teacher+lora@20"]["style_clip"] > 0.95 > rows["student+lora_deturbo@1"]["style_clip"]
    real_params.lora.style_folder = None
    with pytest.raises(ValueError, match="needs lora.style_folder.*nano renderer's style mode is not a reference"):
        worlds.load_world(real_params, readers=fake_readers()).score_rows({"t@20": red}, "t@20", red, style=True)


def test_fid_from_features_is_torchmetrics_fid():
    """The reader path (features once, torchmetrics' arithmetic) equals FrechetInceptionDistance with the same
    extractor as its custom feature module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Extractor(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return fake_inception(x).float()

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(20, 3, 8, 8, generator=g), torch.rand(20, 3, 8, 8, generator=g).pow(2)
    fid = FrechetInceptionDistance(feature=Extractor(), normalize=True)
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert metrics.fid_from_features(fake_inception(a), fake_inception(b)) == pytest.approx(float(fid.compute()),
                                                                                          rel=1e-5)


# --- the real world never touches the nano renderer or probe -----------------------------------------------------------

def test_real_world_never_calls_the_renderer_or_the_probe(real_params, monkeypatch):
    from anima_lib.nano_world import probes, prompts, renderer

    def forbidden(*args, **kwargs):
        raise AssertionError("the real world called into the nano world")
    for module, name in ((renderer, "render"), (renderer, "render_batch"), (prompts, "sample_creatures"),
                         (probes, "load_probe"), (metrics, "ProbeReader"), (metrics, "fd_probe"),
                         (metrics, "score_images"), (gate, "render_reference"), (gate, "score_rows")):
        monkeypatch.setattr(module, name, forbidden)
    world = worlds.load_world(real_params, readers=fake_readers())
    images = colour_images(world.gate, seed=1)
    rows = world.score_rows({"teacher@20": images, "student@1": images.flip(-1)}, "teacher@20", images.flip(-2),
                            style=True)
    world.verdict(rows, {"teacher@20": 1.0, "student@1": 30.0}, "teacher@20")
    assert world.reference_images() is None and world.labels([0]) == ["a red ball number 0"]


def test_real_world_does_not_import_the_renderer_or_the_probe(real_params):
    """In a fresh interpreter: building and scoring a real world leaves the renderer and probe modules unimported."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(config.REPO_ROOT / 'tests')!r})
from test_real_world_gate import fake_readers, colour_images
from anima_lib import config, worlds
params = config.load_config("anima-2b", {json.dumps(real_params_overrides(real_params))!s})
world = worlds.load_world(params, readers=fake_readers())
images = colour_images(world.gate, seed=1)
world.score_rows({{"teacher@20": images}}, "teacher@20", images.flip(-1), style=True)
bad = [m for m in ("anima_lib.nano_world.renderer", "anima_lib.nano_world.probes", "anima_lib.nano_world.teacher")
       if m in sys.modules]
print("IMPORTED", bad)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=config.REPO_ROOT)
    assert "IMPORTED []" in result.stdout, result.stdout + result.stderr[-2000:]


def real_params_overrides(p) -> dict:
    return {"run.output_dir": p.run.output_dir, "run.report_dir": p.run.report_dir, "run.device": "cpu",
            "model.diffusers_dir": p.model.diffusers_dir, "cache.prompts_file": p.cache.prompts_file,
            "gate.prompts_file": p.gate.prompts_file, "gate.n_prompts": p.gate.n_prompts,
            "gate.seeds_per_prompt": p.gate.seeds_per_prompt, "gate.image_size": p.gate.image_size,
            "gate.inception_weights": p.gate.inception_weights, "gate.clip_checkpoint": p.gate.clip_checkpoint,
            "lora.style_folder": p.lora.style_folder}


def test_load_world_uses_the_production_readers_unless_given(real_params, monkeypatch):
    made = []
    monkeypatch.setattr(worlds, "production_readers", lambda params: made.append(params) or fake_readers())
    world = worlds.load_world(real_params)
    assert made == [real_params] and world.readers.names["fid"].startswith("FID: stand-in")


# --- the nano world: exactly today's numbers ---------------------------------------------------------------------------

def test_nano_world_is_the_old_gate_exactly(tmp_path):
    from anima_lib.nano_world import probes
    from anima_lib.nano_world.prompts import sample_creatures
    params = config.load_config("nano", ["gate.n_prompts=6", "gate.seeds_per_prompt=2", f"run.output_dir={tmp_path}/o",
                                         f"run.report_dir={tmp_path}/r"])
    probe = probes.load_probe()
    world = worlds.load_world(params, probe=probe)
    assert isinstance(world, worlds.NanoWorld) and world.kind == worlds.NANO
    creatures = sample_creatures(6, seed=params.run.seed + gate.GATE_PROMPT_SEED_OFFSET)  # the gate's draw, unchanged
    assert world.gate.prompts == [c.prompt() for c in creatures]
    assert world.gate.attributes == [c.to_dict() for c in creatures]
    renders = gate.render_reference(params, world.gate)
    others = gate.render_reference(params, world.gate, stream=gate.NOISE_FLOOR)
    blurred = probes.blur(others, 1.5)
    samples = {"teacher@20": others, "teacher@1": blurred, "student@1": others.flip(-1)}
    expected = gate.score_rows(samples, "teacher@20", renders.flip(-2), renders, others, world.gate, probe)
    assert world.score_rows(samples, "teacher@20", renders.flip(-2)) == expected
    assert torch.equal(world.reference_images(), renders) and world.keep(others) is others
    checks, verdict, headline = world.verdict(expected, {"teacher@20": 1.0, "student@1": 30.0}, "teacher@20")
    checks = checks_mod.as_record(checks)
    assert "teacher@20 alignment ≥ 0.85" in checks and verdict.startswith("teacher@20: alignment ")
    assert set(headline) == {"teacher@20.alignment", "teacher@1.alignment", "student@1.alignment", "fd_probe_ratio@1",
                             "teacher@20.strict_alignment", "student@1.strict_alignment"}   # + the detail reader's


def test_anima_2b_preset_carries_the_published_2b_recipe():
    """rCM, Cosmos-Predict2 2B T2I (paper Table 4): the values the preset's comments cite."""
    p = config.load_config("anima-2b", ["run.device=cpu"], check_paths=False)
    d, s = p.distill, p.sampler
    assert (d.lr, d.fake_lr, d.batch_size, d.student_every, d.max_rollout) == (1e-6, 2e-7, 512, 5, 4)
    assert d.dmd_weight / d.scm_weight == pytest.approx(0.01) and d.tangent_warmup == 0
    assert d.student_updates * d.student_every == 30_000  # 30k iterations, critic steps included
    assert (d.p_g, d.p_d) == ([-0.8, 1.6], [0.0, 1.6])
    assert s.sigma_max == 80 and s.student_mid_times == [1.3, 1.0, 0.6] and s.teacher_steps == 20
    assert (d.tangent, d.parallel, d.activation_checkpointing) == ("fd", "fsdp", True)
    assert p.cache.prompts_file and p.gate.prompts_file and p.gate.inception_weights and p.gate.clip_checkpoint
