import os
import subprocess
import sys

import pytest

from anima_lib import config
from anima_lib.config import ConfigError, load_config

BIN = os.path.dirname(sys.executable)


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def base(tmp_path):
    """A valid preset writing into tmp_path."""
    return f"run:\n  output_dir: {tmp_path}/out\n  report_dir: {tmp_path}/rep\n"


@pytest.mark.parametrize("preset", ["nano", "smoke"])
def test_shipped_cpu_presets_validate(preset):
    p = load_config(preset)
    assert p.model.preset == "nano"
    assert max(p.gate.teacher_steps) <= 1000


def test_anima_2b_preset_names_missing_checkpoint():
    with pytest.raises(ConfigError, match=r"params/anima-2b.yaml.*model.diffusers_dir.*no such folder"):
        load_config("anima-2b")


def test_anima_2b_without_any_path(tmp_path):
    path = write(tmp_path, base(tmp_path) + "model:\n  preset: anima-2b\n")
    with pytest.raises(ConfigError, match="needs local checkpoint paths.*nothing is downloaded"):
        load_config(path)


def test_anima_2b_comfy_needs_all_files(tmp_path):
    dit = tmp_path / "dit.safetensors"
    dit.write_bytes(b"x")
    path = write(tmp_path, base(tmp_path) + f"model:\n  preset: anima-2b\n  comfy_diffusion_model: {dit}\n")
    with pytest.raises(ConfigError, match="model.comfy_text_encoder is missing"):
        load_config(path)


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    path = write(tmp_path, base(tmp_path) + "gate:\n  n_prompt: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "gate.n_prompt" in msg and str(path) in msg and "n_prompts" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'gat'"):
        load_config(write(tmp_path, base(tmp_path) + "gat:\n  n_prompts: 4\n"))


@pytest.mark.parametrize("override, pattern", [
    ("gate.n_prompts=four", r"gate.n_prompts = 'four' has type str; expected int"),
    ("gate.n_prompts=2.5", r"expected int"),
    ("run.seed=true", r"run.seed = True has type bool"),
    ("gate.student_steps=[1,3]", r"each entry must be one of \[1, 2, 4\]"),
    ("sampler.teacher_steps=0", r"must be between 1 and 1000"),
    ("sampler.shift=-1", r"sampler.shift = -1.0 must be > 0"),
    ("model.dtype=float8", r"not allowed; allowed: \['float32', 'bfloat16', 'float16'\]"),
    ("sampler.student_mid_times=[1.0,1.3,0.6]", r"decreasing TrigFlow times"),
    ("gate.image_size=20", r"multiple of 16"),
    ("model.nano_weights=/nonexistent/teacher", r"no such folder"),
    ("quant.bits=5", r"quant.bits = 5 is not allowed; allowed: \[3, 4, 8\]"),
    ("quant.group_size=16", r"quant.group_size = 16 is not allowed; allowed: \[32, 64, 128\]"),
    ("distll.steps=200", r"unknown section 'distll'"),
    ("distill.steps=200", r"unknown key distill.steps; allowed keys in 'distill'"),
    ("distill.baselines=[scm,ladd]", r"distill.baselines = \['scm', 'ladd'\] each entry must be one of \['scm', 'lcm'\]"),
    ("distill.lr=0", r"distill.lr = 0.0 must be > 0"),
    ("distill.p_g=[-0.8]", r"distill.p_g = \[-0.8\] must be \[mean, std\]"),
    ("distill.checkpoint=/no/such/ema.safetensors", r"distill.checkpoint = .* no such file"),
    ("gate=3", r"the key must be section.key"),
    ("sampler.teacher_steps=30", r"gate.teacher_steps = \[1, 2, 4, 20\] must include sampler.teacher_steps = 30"),
])
def test_bad_values_fail_with_the_key(tmp_path, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, base(tmp_path)), [override])


def test_cuda_without_a_gpu_is_a_parameter_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="run.device = 'cuda' but this machine has no CUDA device"):
        load_config(write(tmp_path, base(tmp_path)), ["run.device=cuda"])


def test_overrides_are_typed_and_applied(tmp_path):
    p = load_config(write(tmp_path, base(tmp_path)), ["gate.n_prompts=3", "sampler.guidance_scale=2",
                                                      "gate.teacher_steps=[1, 8]", "sampler.teacher_steps=8"])
    assert p.gate.n_prompts == 3 and p.sampler.guidance_scale == 2.0 and isinstance(p.sampler.guidance_scale, float)
    assert p.gate.teacher_steps == [1, 8]
    assert "--set" in p.source


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="run.output_dir.*not writable"):
        load_config(write(tmp_path, base(tmp_path)), [f"run.output_dir={locked}/sub"])


def test_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="run.output_dir.*not writable"):
        load_config(write(tmp_path, base(tmp_path)), [f"run.output_dir={blocker}/sub"])


def test_cli_parameter_error_exits_2_before_compute(tmp_path):
    result = subprocess.run([f"{BIN}/anima", "run", "nano", "--set", "gate.student_steps=[3]",
                             "--set", f"run.output_dir={tmp_path}/o", "--set", f"run.report_dir={tmp_path}/r"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gate.student_steps" in result.stderr and "params/nano.yaml" in result.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.html"))


def test_cli_params_prints_resolved_values():
    result = subprocess.run([f"{BIN}/anima", "params", "smoke", "--set", "gate.n_prompts=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "n_prompts: 3" in result.stdout


def test_describe_lists_every_parameter():
    text = config.describe()
    for section, cls in config._SECTION_CLASSES.items():
        for name in cls.__dataclass_fields__:
            assert f"  {name}:" in text


# --- issue 18 hardening -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../somewhere", "..", "", ".hidden", "a/b", "/abs", "a b", "x" * 101])
def test_run_name_must_be_one_plain_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match=r"run\.name = .* must be one plain folder name"):
        load_config(write(tmp_path, base(tmp_path)), {"run.name": name})


@pytest.mark.parametrize("name", ["nano-2", "v1.2_x", "A", "_tmp"])
def test_plain_run_names_stay_inside_output_dir(tmp_path, name):
    p = load_config(write(tmp_path, base(tmp_path)), {"run.name": name})
    assert p.output_path().parent == tmp_path / "out" and p.output_path().name == name


@pytest.mark.parametrize("tag, ok", [("", True), ("rank16", True), ("a.b", True), (".x", False), ("../x", False),
                                     ("a/b", False)])
def test_run_tag_follows_the_name_rule_but_may_be_empty(tmp_path, tag, ok):
    path = write(tmp_path, base(tmp_path))
    if ok:
        assert load_config(path, {"run.tag": tag}).report_name() == ("nano-" + tag if tag else "nano")
    else:
        with pytest.raises(ConfigError, match=r"run\.tag = .* one plain folder name"):
            load_config(path, {"run.tag": tag})


def test_cli_params_bad_run_name_is_one_line_and_rc_2(capsys):
    from anima_lib.cli import main
    assert main(["params", "nano", "--set", "run.name=../x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("anima: parameter error: params/nano.yaml") and "run.name = '../x'" in err


def test_scientific_notation_is_a_float(tmp_path):
    assert config.parse_override("distill.lr=1e-4") == (["distill", "lr"], 1e-4)
    path = write(tmp_path, base(tmp_path) + "distill:\n  lr: 1e-4\n  fake_lr: 2.5e-5\n  scm_weight: 1E2\n")
    p = load_config(path, ["teacher.lr=3E-4", "sampler.guidance_scale=1e1", "distill.p_d=[0, 1.6e0]"])
    assert (p.distill.lr, p.distill.fake_lr, p.distill.scm_weight) == (1e-4, 2.5e-5, 100.0)
    assert (p.teacher.lr, p.sampler.guidance_scale, p.distill.p_d) == (3e-4, 10.0, [0.0, 1.6])


@pytest.mark.parametrize("override", ["distill.lr=.inf", "distill.minutes=.inf", "sampler.guidance_scale=.inf",
                                      "sampler.shift=.nan", "teacher.logit_mean=-.inf", "distill.p_g=[.nan, 1.0]",
                                      "lora.strengths=[1.0, .inf]"])
def test_non_finite_numbers_are_rejected(tmp_path, override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} = .* must be finite"):
        load_config(write(tmp_path, base(tmp_path)), [override])


@pytest.mark.parametrize("override", ["run.seed=100000000000000000000000", "gate.image_size=16000",
                                      "run.threads=100000", "distill.minutes=100000", "cache.n_prompts=1000000000",
                                      "distill.lr=2", "teacher.logit_mean=-50"])
def test_absurd_sizes_are_rejected(tmp_path, override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} = .*must be between"):
        load_config(write(tmp_path, base(tmp_path)), [override])


def _numeric_fields():
    import dataclasses
    import typing
    for section, cls in config._SECTION_CLASSES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else hints[f.name]
            if kind in (int, float):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                yield section, f.name, kind, default


def test_every_numeric_key_has_a_finite_range(tmp_path):
    """A new numeric key without a range fails here: +-1e30 (or one such list entry) must be rejected by name."""
    path = write(tmp_path, base(tmp_path))
    fields = list(_numeric_fields())
    assert len(fields) > 40
    for section, name, kind, default in fields:
        for huge in (10**30, -10**30):
            huge = kind(huge)
            value = [huge, *default[1:]] if isinstance(default, list) else huge
            with pytest.raises(ConfigError, match=rf"{section}\.{name} = "):
                load_config(path, {f"{section}.{name}": value})


def test_anima_2b_values_are_in_range():
    p = load_config("anima-2b", ["run.device=cpu"], check_paths=False)
    assert p.gate.image_size == 1024


def test_duplicate_keys_name_key_file_and_line(tmp_path):
    path = write(tmp_path, base(tmp_path) + "distill:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"{path}: line 6: duplicate key distill\.lr"):
        load_config(path)
    path = write(tmp_path, base(tmp_path) + "run:\n  seed: 1\n", name="q.yaml")
    with pytest.raises(ConfigError, match=rf"{path}: line 4: duplicate key run;"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n"])
def test_empty_file_is_rejected(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}: the file is empty.*params/nano.yaml"):
        load_config(path)


def test_invalid_utf8_is_a_parameter_error(tmp_path, capsys):
    from anima_lib.cli import main
    path = tmp_path / "latin1.yaml"
    path.write_bytes(base(tmp_path).encode() + b"sampler:\n  negative_prompt: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text"):
        load_config(path)
    assert main(["params", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not UTF-8" in err


def test_nano_negative_prompt_outside_the_vocabulary(tmp_path):
    path = write(tmp_path, base(tmp_path))
    with pytest.raises(ConfigError, match=r"sampler\.negative_prompt = .*outside the nano vocabulary \['blurry', 'ugly'\]"):
        load_config(path, ["sampler.negative_prompt=blurry ugly creature"])
    assert load_config(path, ["sampler.negative_prompt=dark background"]).sampler.negative_prompt == "dark background"
    # anima-2b has a real tokenizer: any words are fine there
    p = load_config("anima-2b", ["run.device=cpu", "sampler.negative_prompt=blurry, lowres"], check_paths=False)
    assert p.sampler.negative_prompt == "blurry, lowres"


def test_validation_creates_no_folders(tmp_path):
    from anima_lib.cli import main
    fresh = tmp_path / "fresh"
    path = write(tmp_path, f"run:\n  output_dir: {fresh}/out\n  report_dir: {fresh}/rep\n")
    load_config(path)
    assert main(["params", str(path)]) == 0
    assert not fresh.exists()


def test_renamed_keys_are_refused_naming_the_new_key(tmp_path):
    """distill.student_steps counted optimizer updates (gate.student_steps: sampler steps): it is now
    distill.student_updates, and the old key fails naming the new one, from a preset, --set, or papermill's dict."""
    assert config.RENAMED_KEYS["distill.student_steps"] == "distill.student_updates"
    message = r"distill\.student_steps is now distill\.student_updates \(renamed; update your preset or --set\)"
    preset = write(tmp_path, base(tmp_path) + "distill:\n  student_steps: 10\n")
    with pytest.raises(ConfigError, match=message):
        load_config(preset)
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", ["distill.student_steps=10"])
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", {"distill.student_steps": 10})
    assert load_config("smoke", ["distill.student_updates=10"]).distill.student_updates == 10
    assert load_config("smoke", ["gate.student_steps=[1,4]"]).gate.student_steps == [1, 4]  # not renamed
    for old, new in config.RENAMED_KEYS.items():   # every new name exists; no old name does
        for name, exists in ((new, True), (old, False)):
            section, key = name.split(".")
            assert (key in getattr(config.Params(), section).__dataclass_fields__) == exists, name
