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
