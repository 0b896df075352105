"""04's refinement of a quantized student's group scales and biases: the codes and the file format stay, the chain
error against full precision falls on prompts never trained on, and a fit that makes things worse is thrown away."""
import copy
import json

import pytest
import torch
from diffusers import CosmosTransformer3DModel

from anima_lib import config
from anima_lib.networks import NANO_TRANSFORMER
from anima_lib.quant import packed, refine

LATENT = (48, 1, 4, 4)
STEPS = (1, 2, 4)


def _setup(prompts=16, seed=0):
    torch.manual_seed(seed)
    student = CosmosTransformer3DModel(**{**NANO_TRANSFORMER, "num_layers": 1}).float().eval().requires_grad_(False)
    quantized, _, _ = packed.quantize_model(copy.deepcopy(student), {"bits": 4, "group_size": 32, "layers": {}},
                                            "minmax", torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    noises = [torch.randn(prompts, *LATENT, generator=g) for _ in range(max(STEPS))]
    context = torch.randn(prompts, 8, NANO_TRANSFORMER["text_embed_dim"], generator=g)
    return student, quantized.float(), noises, context, config.load_config("nano", [])


def _affine(model):
    return {n: (m.weight.clone(), m.scales.clone(), m.biases.clone())
            for n, m in model.named_modules() if isinstance(m, packed.QuantizedLinear)}


def test_refinement_lowers_the_held_out_chain_error_and_keeps_codes_and_format():
    student, quantized, noises, context, params = _setup()
    before = _affine(quantized)
    result = refine.refine_affine(quantized, student, noises, context, params, STEPS, updates=30, lr=3e-3,
                                  batch_size=8, progress=False)
    after = _affine(quantized)
    print({w: {s: result[w]["validation"][s] for s in STEPS} for w in ("before", "after")})
    assert result["kept"] and (result["train_prompts"], result["validation_prompts"]) == (12, 4)
    for k in STEPS:   # every served step count, on the 4 prompts the updates never saw
        assert result["after"]["validation"][k] < 0.9 * result["before"]["validation"][k]
    assert set(after) == set(before) and len(after) > 4
    changed = 0
    for name, (words, scales, biases) in after.items():
        assert torch.equal(words, before[name][0])                      # the codes are the file's, untouched
        assert scales.shape == before[name][1].shape and scales.dtype == before[name][1].dtype
        for values in (scales, biases):                                # stored as bf16 in the checkpoint: exact
            assert torch.equal(values.to(torch.bfloat16).float(), values)
        changed += int(not torch.equal(scales, before[name][1]))
    assert changed == len(after)
    assert not any(isinstance(m, refine._TrainableAffine) for m in quantized.modules())
    assert len(result["loss"]) == 30 and set(result["loss"][0]) == {"iteration", "@1"}


def test_a_fit_that_raises_the_validation_error_is_discarded():
    student, quantized, noises, context, params = _setup(seed=3)
    before = _affine(quantized)
    result = refine.refine_affine(quantized, student, noises, context, params, STEPS, updates=6, lr=1.0,
                                  batch_size=8, progress=False)   # scales × e^±1 per update: diverges
    assert not result["kept"]
    assert not (sum(result["after"]["validation"].values()) < sum(result["before"]["validation"].values()))
    for name, tensors in _affine(quantized).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[name]))


def test_refinement_parameters_are_checked_before_any_work():
    assert config.refine_split(128) == (96, 32) and config.refine_split(4) == (3, 1)
    with pytest.raises(config.ConfigError, match="quant.refine_batch = 97 .* 96 prompts"):
        config.load_config("nano", ["quant.refine_batch=97"])
    assert config.load_config("nano", ["quant.refine_batch=96"]).quant.refine_batch == 96
    with pytest.raises(config.ConfigError, match="refine_lr"):
        config.load_config("nano", ["quant.refine_lr=0"])
    student, quantized, noises, context, params = _setup(prompts=1)
    with pytest.raises(ValueError, match="1 prompts leave none to train on"):
        refine.refine_affine(quantized, student, noises, context, params, STEPS, 2, 1e-3, 1, progress=False)


def test_refinement_runs_under_activation_checkpointing_with_the_same_result():
    """anima-2b refines with every block recomputed in backward (a 4-step chain's activations at 1024² would not fit):
    same updates, same scales and biases."""
    from anima_lib.distill.parallel import checkpoint_activations
    fitted = []
    for checkpointed in (False, True):
        student, quantized, noises, context, params = _setup(prompts=8, seed=5)
        if checkpointed:
            checkpoint_activations(quantized)
        refine.refine_affine(quantized, student, noises, context, params, STEPS, updates=3, lr=3e-3, batch_size=4,
                             progress=False)
        fitted.append(_affine(quantized))
    for name, (words, scales, biases) in fitted[0].items():
        assert torch.allclose(scales, fitted[1][name][1]) and torch.allclose(biases, fitted[1][name][2])


def test_a_killed_refinement_resumes_exactly(tmp_path, monkeypatch):
    """Checkpoints every 2 updates; a crash at update 5 loses only update 5, and the resumed fit equals the straight one.
    A checkpoint of another model is not mixed in."""
    def run(folder, crash_at=None):
        student, quantized, noises, context, params = _setup(prompts=8, seed=7)
        if crash_at is not None:
            calls, step = [0], torch.optim.Adam.step

            def crashing_step(self, *args, **kwargs):
                calls[0] += 1
                if calls[0] == crash_at:
                    raise RuntimeError("killed")
                return step(self, *args, **kwargs)
            monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
        try:
            result = refine.refine_affine(quantized, student, noises, context, params, STEPS, updates=6, lr=3e-3,
                                          batch_size=4, progress=False, checkpoint_dir=folder, checkpoint_every=2)
        finally:
            monkeypatch.undo()
        return result, _affine(quantized)

    straight, straight_affine = run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "crashed", crash_at=5)
    assert json.loads((tmp_path / "crashed" / "last" / "state.json").read_text())["update"] == 4
    resumed, resumed_affine = run(tmp_path / "crashed")
    assert [h["iteration"] for h in resumed["loss"]] == list(range(6)) and resumed["loss"] == straight["loss"]
    for name, tensors in straight_affine.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, resumed_affine[name]))
    # another quantized model (other weights): the stale checkpoint is replaced, not loaded
    student, quantized, noises, context, params = _setup(prompts=8, seed=8)
    other = refine.refine_affine(quantized, student, noises, context, params, STEPS, updates=6, lr=3e-3,
                                 batch_size=4, progress=False, checkpoint_dir=tmp_path / "crashed", checkpoint_every=2)
    assert other["loss"] != straight["loss"] and len(other["loss"]) == 6
