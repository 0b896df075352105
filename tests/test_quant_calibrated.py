"""Calibration-aware MLX-affine quantization (awq, gptq): the files stay the format the engine reads (the real mlx
dequantizes them like we do), each method lowers the error it is built to lower, and awq's scale fold is exact."""
import copy
import json

import numpy as np
import pytest
import torch

from anima_lib.quant import calibrated, mlx_affine, packed


def _correlated_inputs(n=4096, k=128, seed=0):
    """Inputs with a few hot channels and strong correlations (what real activations look like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    x[:, :4] *= 8.0                              # hot channels
    return x


def _gram(x):
    return calibrated.Gram((x.double() ** 2).sum(0), x.shape[0], x.T @ x)


def _output_error(weight, words_scales_biases, x, group_size, bits):
    deq = mlx_affine.dequantize(*words_scales_biases, group_size, bits, torch.float32)
    return float(((x @ weight.T - x @ deq.T) ** 2).mean())


def test_gptq_lowers_output_error_and_keeps_the_format():
    torch.manual_seed(0)
    weight = (torch.randn(96, 128) * 0.05).to(torch.bfloat16).float()
    x = _correlated_inputs()
    gram = _gram(x)
    search = mlx_affine.quantize(weight.bfloat16(), 32, 4, "search")
    gptq = calibrated.gptq_quantize(weight, gram, 32, 4)
    words, scales, biases = gptq
    assert words.dtype == torch.uint32 and words.shape == (96, 16) and scales.shape == biases.shape == (96, 4)
    assert scales.dtype == torch.bfloat16
    e_search, e_gptq = _output_error(weight, search, x, 32, 4), _output_error(weight, gptq, x, 32, 4)
    print({"search": e_search, "gptq": e_gptq})
    assert e_gptq < 0.6 * e_search
    # the Gram-measured error is the mean output error
    deq = mlx_affine.dequantize(*gptq, 32, 4, torch.float32)
    assert calibrated.output_error(weight, deq, gram) == pytest.approx(e_gptq * 96, rel=1e-3)


def test_weighted_fit_lowers_the_weighted_error_and_unit_weights_change_nothing():
    torch.manual_seed(1)
    weight = torch.randn(64, 128).bfloat16()
    plain = mlx_affine.quantize(weight, 32, 4, "search")
    unit = calibrated.weighted_quantize(weight, torch.ones(128), 32, 4)
    assert all(torch.equal(a, b) for a, b in zip(plain, unit))
    importance = torch.ones(128)
    importance[::7] = 50.0
    weighted = calibrated.weighted_quantize(weight, importance, 32, 4)

    def weighted_error(q):
        return float((importance * (mlx_affine.dequantize(*q, 32, 4, torch.float32) - weight.float()) ** 2).sum())
    assert weighted_error(weighted) < 0.9 * weighted_error(plain)


class Attention(torch.nn.Module):
    """The value path of an attention block: to_v -> (a convex mix of tokens) -> to_out, as Cosmos' processor."""

    def __init__(self):
        super().__init__()
        self.to_v = torch.nn.Linear(64, 64, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(64, 32, bias=False), torch.nn.Dropout(0.0)])
        self.processor = type("CosmosAttnProcessor2_0", (), {})()

    def forward(self, x):
        mix = torch.softmax(x[..., :8] @ x[..., :8].transpose(-1, -2), -1)
        return self.to_out[0](mix @ self.to_v(x))


def test_awq_fold_is_exact_and_lowers_the_output_error():
    torch.manual_seed(2)
    model = Attention()
    with torch.no_grad():
        model.to_v.weight[:6] *= 10.0            # a few hot value channels: the input of to_out
    x = torch.randn(32, 16, 64)
    layers = ["to_v", "to_out.0"]
    assert calibrated.fold_pairs(model) == [("to_v", "to_out.0")]
    grams = calibrated.collect_grams(model, lambda m: m(x), layers)
    assert grams["to_out.0"].count == 32 * 16
    folded = copy.deepcopy(model)
    alphas = calibrated.fold_awq_scales(folded, dict(grams), {"to_out.0": {"bits": 4, "group_size": 32}},
                                        torch.float32)
    assert alphas["to_out.0"] > 0
    assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)       # the full-precision function is unchanged
    policy = {"bits": 4, "group_size": 32, "layers": {"to_v": "keep"}}
    errors = {}
    for method in ("search", "awq", "gptq", "awq_gptq"):
        q, _, _ = packed.quantize_model(copy.deepcopy(model), policy, method, torch.float32, grams)
        with torch.no_grad():
            errors[method] = float(((q(x) - model(x)) ** 2).mean())
    print(errors)
    assert errors["awq"] < 0.8 * errors["search"]
    assert errors["awq_gptq"] < min(errors["awq"], errors["gptq"])   # error feedback on the folded weights: both gains


def test_calibrated_methods_need_calibration():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match="'gptq' needs calibration inputs for every quantized layer; none for"):
        packed.quantize_model(model, {"bits": 4, "group_size": 32}, "gptq")
    with pytest.raises(ValueError, match="method 'nf4': allowed"):
        calibrated.quantize_weight(torch.randn(4, 32), 32, 4, "nf4")
    with pytest.raises(ValueError, match="calibration never reached"):
        calibrated.collect_grams(model, lambda m: None, ["0"])


@pytest.mark.parametrize("method", ["awq", "gptq", "awq_gptq"])
def test_calibrated_checkpoint_reads_back_and_matches_mlx(tmp_path, method):
    """A checkpoint written with a calibrated method is the same MLX layout: our reader loads it, and the real mlx's
    quantized_matmul on its tensors equals our dequantize-and-matmul."""
    mx = pytest.importorskip("mlx.core")
    torch.manual_seed(3)
    model = torch.nn.Sequential(Attention())
    x = torch.randn(8, 16, 64)
    layers = ["0.to_v", "0.to_out.0"]
    grams = calibrated.collect_grams(model, lambda m: m(x), layers)
    policy = {"bits": 4, "group_size": 32, "layers": {"0.to_v": {"bits": 8, "group_size": 32}}}
    quantized, chosen, kept = packed.quantize_model(copy.deepcopy(model), policy, method, torch.bfloat16, grams)
    packed.save_packed(quantized, tmp_path / "q", policy, chosen, kept)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["0.to_v"] == {"bits": 8, "group_size": 32}
    loaded = packed.load_packed(tmp_path / "q", lambda cfg: torch.nn.Sequential(Attention()))
    assert torch.equal(loaded(x.bfloat16()), quantized(x.bfloat16()))
    layer = loaded[0].to_out[0]
    inputs = np.random.RandomState(0).randn(5, 64).astype(np.float32)
    theirs = mx.quantized_matmul(mx.array(inputs), mx.array(layer.weight.numpy()),
                                 mx.array(layer.scales.float().numpy()), mx.array(layer.biases.float().numpy()),
                                 transpose=True, group_size=32, bits=4)
    ours = torch.from_numpy(inputs) @ layer.dequantized_weight(torch.float32).T
    assert np.allclose(np.array(theirs), ours.numpy(), atol=1e-5)
