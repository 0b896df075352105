"""Issue 18 items 2 and 9: every reader of user-supplied weights refuses NaN/Inf by file and tensor name (LoRA folders
and files with diffusers or ComfyUI keys, packed quantized checkpoints, ComfyUI split files, diffusers folders, parity
fixtures, the probe), and a LoRA whose lora_A/lora_B ranks disagree is a LoraError naming the module before anything
is touched."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_lib import checkpoints, lora, models
from anima_lib.io import NonFiniteWeightsError, WeightsError, sha256_file
from anima_lib.nano_world.prompts import vocabulary
from test_models import tiny_anima  # the same tiny real-config Anima the loader tests use

MODULE = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def nano():
    return models.build_nano(vocabulary(), seed=5)


def _lora(transformer, rank=4, up_rank=None, modules=(MODULE, "transformer_blocks.0.ff.net.2"), seed=0):
    g = torch.Generator().manual_seed(seed)
    linears = lora.target_linears(transformer)
    down = {n: torch.randn(rank, linears[n].in_features, generator=g) * 0.05 for n in modules}
    up = {n: torch.randn(linears[n].out_features, up_rank or rank, generator=g) * 0.05 for n in modules}
    return lora.LoraWeights(down, up, rank, 8.0)


def _poison(path, key, value=float("nan")):
    """Put one NaN/Inf into `key` of a safetensors file, keeping its metadata."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, path, metadata=metadata)


def _rehash(folder):
    manifest = json.loads((folder / lora.MANIFEST).read_text())
    manifest["files"] = {f: sha256_file(folder / f) for f in manifest["files"]}
    (folder / lora.MANIFEST).write_text(json.dumps(manifest))


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- item 2: non-finite weights ---------------------------------------------------------------------------------------

def test_nan_lora_b_in_a_rehashed_lora_folder_is_refused(nano, tmp_path):
    folder = tmp_path / "style"
    lora.save_lora(_lora(nano.transformer), folder, {"kind": "test"})
    key = f"transformer.{MODULE}.lora_B.weight"
    _poison(folder / lora.LORA_FILE, key)
    _rehash(folder)
    assert lora.read_manifest(folder) is not None  # the digest check passes: only the finite check can refuse it
    with pytest.raises(lora.LoraError, match=rf"{lora.LORA_FILE}: tensor '{key}' holds 1 non-finite") as info:
        lora.read_lora(folder)
    assert isinstance(info.value, NonFiniteWeightsError)
    model = copy.deepcopy(nano.transformer)
    before = _state(model)
    with pytest.raises(lora.LoraError, match=key):  # diffusers' loader is never reached
        lora.load_with_diffusers(model, folder, adapter_name="style")
    assert _same(before, model.state_dict())


def test_inf_in_a_comfy_key_lora_file_is_refused(nano, tmp_path):
    lora.save_lora(_lora(nano.transformer), tmp_path / "style", {})
    path = tmp_path / "style" / lora.COMFY_FILE
    key = next(k for k in load_file(path) if k.endswith(".lora_B.weight"))
    assert key.startswith("diffusion_model.")
    _poison(path, key, float("inf"))
    with pytest.raises(lora.LoraError, match=rf"tensor '{key}' holds 1 non-finite"):  # the file's own key, not diffusers'
        lora.read_lora(path)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(20, 64)   # kept in float (20 does not divide by 32)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64, bias=False)


@pytest.mark.parametrize("key", ["fc1.scales", "fc2.biases", "embed.weight"])
def test_inf_in_a_packed_file_is_refused(tmp_path, key):
    from anima_lib.quant import packed
    torch.manual_seed(0)
    policy = {"bits": 4, "group_size": 32}
    quantized, chosen, kept = packed.quantize_model(_Tiny(), policy)
    folder = packed.save_packed(quantized, tmp_path / "q", policy, chosen, kept)
    _poison(folder / packed.WEIGHTS, key, float("inf"))
    with pytest.raises(NonFiniteWeightsError, match=rf"{packed.WEIGHTS}: tensor '{key}' holds 1 non-finite"):
        packed.load_packed(folder, lambda cfg: _Tiny())


@pytest.fixture(scope="module")
def comfy_files(nano, tmp_path_factory):
    return checkpoints.save_comfy_split(tiny_anima(nano), tmp_path_factory.mktemp("comfy"))


@pytest.mark.parametrize("part", ["comfy_diffusion_model", "comfy_text_encoder", "comfy_vae"])
def test_nan_in_a_comfy_split_file_is_refused(comfy_files, tmp_path, part):
    import shutil
    paths = dict(comfy_files)
    paths[part] = tmp_path / paths[part].name
    shutil.copy(comfy_files[part], paths[part])
    key = sorted(k for k, v in load_file(paths[part]).items() if v.is_floating_point())[-1]
    _poison(paths[part], key)
    with pytest.raises(checkpoints.CheckpointError, match=rf"{paths[part].name}: tensor '{key}' holds 1 non-finite") \
            as info:
        checkpoints.load_comfy_split(paths["comfy_diffusion_model"], paths["comfy_text_encoder"], paths["comfy_vae"],
                                     paths["tokenizer_dir"])
    assert isinstance(info.value, NonFiniteWeightsError)


def test_nan_in_a_diffusers_folder_is_refused_by_component(nano, tmp_path):
    folder = checkpoints.save_diffusers_folder(nano, tmp_path / "nano")
    weights = next((folder / "text_conditioner").glob("*.safetensors"))
    key = sorted(load_file(weights))[0]
    _poison(weights, key)
    with pytest.raises(checkpoints.CheckpointError, match=rf"text_conditioner \(AnimaTextConditioner\): tensor '{key}'"):
        checkpoints.load_diffusers_folder(folder)


def test_nan_in_probe_weights_is_refused(tmp_path):
    from anima_lib.nano_world import probes
    probe = probes.Probe()
    key = next(iter(probe.state_dict()))
    with torch.no_grad():
        probe.state_dict()[key].view(-1)[0] = float("nan")
    probes.save_probe(probe, tmp_path / "probe", {})  # manifest hashed over the NaN file
    with pytest.raises(WeightsError, match=rf"tensor '{key}' holds 1 non-finite"):
        probes.load_probe(tmp_path / "probe")


def test_nan_in_a_parity_fixture_is_refused(tmp_path):
    from anima_lib import parity_fixtures
    (tmp_path / parity_fixtures.INDEX).write_text(json.dumps({"prompts": ["x"], "files": {}}))
    save_file({"context": torch.tensor([[1.0, float("nan")]])}, tmp_path / "text.safetensors")
    with pytest.raises(NonFiniteWeightsError, match="text.safetensors: tensor 'context'"):
        parity_fixtures.replay(tmp_path, components=None, student=None)


# --- item 9: rank and shape mismatches --------------------------------------------------------------------------------

def test_rank_mismatch_is_a_lora_error_naming_the_module_before_anything_changes(nano, tmp_path):
    bad = _lora(nano.transformer, rank=4, up_rank=6, modules=(MODULE,))
    shapes = rf"{MODULE}: lora_A \(4, \d+\) lora_B \(\d+, 6\)"
    before = _state(nano.transformer)
    good = _lora(nano.transformer, modules=("transformer_blocks.0.ff.net.2",))
    with pytest.raises(lora.LoraError, match=shapes):
        lora.fused(nano.transformer, [(good, 1.0), (bad, 1.0)])
    assert _same(before, nano.transformer.state_dict())
    lora.save_lora(bad, tmp_path / "bad", {})
    with pytest.raises(lora.LoraError, match=shapes):
        lora.read_lora(tmp_path / "bad")
    model = copy.deepcopy(nano.transformer)
    with pytest.raises(lora.LoraError, match=shapes):
        lora.load_with_diffusers(model, tmp_path / "bad", adapter_name="bad")
    assert _same(before, model.state_dict())


def test_rank_mismatch_against_a_training_adapter_is_a_lora_error(nano):
    model = copy.deepcopy(nano.transformer)
    lora.add_adapter(model, rank=4, alpha=8.0)
    before = _state(model)
    with pytest.raises(lora.LoraError, match=MODULE):
        lora.set_adapter(model, _lora(nano.transformer, rank=6, modules=(MODULE,)))
    with pytest.raises(lora.LoraError, match=rf"{MODULE}: lora_A \(4, \d+\) lora_B \(\d+, 6\)"):
        lora.set_adapter(model, _lora(nano.transformer, rank=4, up_rank=6, modules=(MODULE,)))
    assert _same(before, model.state_dict())


def test_in_and_out_dims_must_fit_the_target_module(nano):
    linear = lora.target_linears(nano.transformer)[MODULE]
    weights = _lora(nano.transformer, modules=(MODULE,))
    weights.down[MODULE] = torch.zeros(4, linear.in_features + 1)
    with pytest.raises(lora.LoraError, match=rf"{MODULE}: A \(4, {linear.in_features + 1}\)"):
        lora.fused(nano.transformer, [(weights, 1.0)])
    weights = _lora(nano.transformer, modules=(MODULE,))
    weights.up[MODULE] = torch.zeros(linear.out_features + 2, 4)
    with pytest.raises(lora.LoraError, match=rf"{MODULE}: A .* B \({linear.out_features + 2}, 4\)"):
        lora.fused(nano.transformer, [(weights, 1.0)])
