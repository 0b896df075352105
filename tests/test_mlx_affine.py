"""MLX affine quantization against the real mlx (the oracle) and the golden files; packed models and checkpoints."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anima_lib.quant import mlx_affine, packed

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "quant"


def _weights():
    rs = np.random.RandomState(0)
    w = rs.randn(16, 256).astype(np.float32)
    w[0, :32] = 0.5                     # a constant group
    w[1, :32] = -rs.rand(32)            # an all-negative group
    w[2, :64] *= 40                     # outliers
    return w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bit_identical_to_mlx(dtype):
    mx = pytest.importorskip("mlx.core")
    w = _weights()
    for bits in mlx_affine.BITS:
        for group_size in mlx_affine.GROUP_SIZES:
            words, scales, biases = mlx_affine.quantize(torch.from_numpy(w).to(getattr(torch, dtype)), group_size, bits)
            m_words, m_scales, m_biases = mx.quantize(mx.array(w).astype(getattr(mx, dtype)), group_size=group_size,
                                                      bits=bits)
            assert np.array_equal(np.array(m_words), words.numpy()), (bits, group_size)
            assert torch.equal(scales.float(), torch.from_numpy(np.array(m_scales.astype(mx.float32))))
            assert torch.equal(biases.float(), torch.from_numpy(np.array(m_biases.astype(mx.float32))))
            assert scales.dtype == getattr(torch, dtype) and words.dtype == torch.uint32


def test_quantized_matmul_matches_mlx():
    mx = pytest.importorskip("mlx.core")
    w, x = _weights(), np.random.RandomState(1).randn(3, 256).astype(np.float32)
    words, scales, biases = mlx_affine.quantize(torch.from_numpy(w), 32, 4)
    ours = torch.from_numpy(x) @ mlx_affine.dequantize(words, scales, biases, 32, 4).T
    theirs = mx.quantized_matmul(mx.array(x), mx.array(words.numpy()), mx.array(scales.numpy()),
                                 mx.array(biases.numpy()), transpose=True, group_size=32, bits=4)
    assert np.allclose(ours.numpy(), np.array(theirs), atol=1e-5)


def test_packing_layout_lsb_first():
    codes = torch.tensor([[14, 13, 12, 11, 10, 9, 8, 7]])
    assert int(mlx_affine.pack(codes, 4)[0, 0]) == 0x789ABCDE  # the spec's example
    three = torch.randint(0, 8, (5, 64))
    assert torch.equal(mlx_affine.unpack(mlx_affine.pack(three, 3), 3, 64), three)


@pytest.mark.skipif(not GOLDEN.is_dir(), reason="shared/fixtures/quant not beside this checkout")
def test_golden_checkpoint_dequantizes_exactly():
    from safetensors.torch import load_file
    tensors = load_file(GOLDEN / "mlx_ckpt" / "model.safetensors")
    quantization = json.loads((GOLDEN / "mlx_ckpt" / "config.json").read_text())["quantization"]
    for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1"):
        fmt = quantization.get(name, quantization)
        ours = mlx_affine.dequantize(tensors[f"{name}.weight"], tensors[f"{name}.scales"], tensors[f"{name}.biases"],
                                     fmt["group_size"], fmt["bits"], torch.float32)
        expected = torch.from_numpy(np.fromfile(GOLDEN / f"{name}.ref.f32", dtype="<f4")).reshape(ours.shape)
        assert torch.equal(ours, expected), name


def test_better_than_min_max_inside_the_format():
    w = torch.from_numpy(_weights()).to(torch.bfloat16)
    errors = {}
    for method in mlx_affine.METHODS:
        for bits in (4, 8):
            deq = mlx_affine.dequantize(*mlx_affine.quantize(w, 32, bits, method), 32, bits, torch.float32)
            errors[method, bits] = float((deq - w.float()).norm() / w.float().norm())
    print({f"{m}@{b}": round(e, 5) for (m, b), e in errors.items()})
    assert errors["rerround", 8] < 0.8 * errors["minmax", 8]   # the bf16-stored parameters no longer cost 60%
    assert errors["search", 4] < 0.97 * errors["minmax", 4]


def test_bad_formats_and_shapes():
    with pytest.raises(ValueError, match="bits=5"):
        mlx_affine.quantize(torch.randn(4, 64), 32, 5)
    with pytest.raises(ValueError, match="group_size=16"):
        mlx_affine.quantize(torch.randn(4, 64), 16, 4)
    with pytest.raises(ValueError, match="multiple of group_size=32"):
        mlx_affine.quantize(torch.randn(4, 48), 32, 4)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(20, 64)      # 20 does not divide by 32: kept and listed
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64, bias=False)
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(self.embed(x)))))


def test_packed_checkpoint_round_trip_and_mismatch_error(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    policy = {"bits": 4, "group_size": 32, "layers": {"fc2": {"bits": 8, "group_size": 64}}}
    quantized, chosen, kept = packed.quantize_model(copy.deepcopy(model), policy)
    assert set(chosen) == {"fc1", "fc2"} and "not divisible" in kept["embed"]
    packed.save_packed(quantized, tmp_path / "q", policy, chosen, kept)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["fc2"] == {"bits": 8, "group_size": 64} and "fc1" not in config["quantization"]
    loaded = packed.load_packed(tmp_path / "q", lambda cfg: Tiny())
    assert loaded.fc1.weight.dtype == torch.uint32 and loaded.fc1.weight.shape == (128, 8)
    x = torch.randn(5, 20)
    assert torch.equal(loaded(x.bfloat16()), quantized(x.bfloat16()))
    cosine = torch.nn.functional.cosine_similarity(loaded(x.bfloat16()).float().flatten(), model(x).flatten(), dim=0)
    assert cosine > 0.99
    config["quantization"]["fc1"] = {"bits": 8, "group_size": 32}   # disagrees with the stored tensors
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer fc1: config says 8-bit group 32"):
        packed.load_packed(tmp_path / "q", lambda cfg: Tiny())


def test_ledger_predicts_the_packed_file_and_counts_the_real_anima():
    from anima_lib import models
    from anima_lib.quant import ledger
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256), torch.nn.LayerNorm(256))
    policy = {"bits": 4, "group_size": 32, "layers": {"1": {"bits": 8, "group_size": 64}}}
    predicted = ledger.module_bytes(model, policy)["bytes"]
    quantized, chosen, kept = packed.quantize_model(copy.deepcopy(model), policy)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        packed.save_packed(quantized, Path(tmp), policy, chosen, kept)
        size = (Path(tmp) / packed.WEIGHTS).stat().st_size
    assert predicted <= size <= predicted + 4096   # the safetensors header is the only difference
    rows = ledger.anima_ledger({"bf16": {"transformer": "bf16", "text_encoder": "bf16", "text_conditioner": "bf16",
                                         "vae_decoder": "bf16"},
                                "planned": ledger.SCENARIOS["planned: DiT 4-bit g32 policy, TE Q8_0"]})
    assert rows["bf16"]["transformer"] == 2 * models.ANIMA_2B_TRANSFORMER_PARAMS
    assert rows["planned"]["total_GB"] < 2.5 and rows["planned"]["total_GiB"] == pytest.approx(
        rows["planned"]["total_GB"] * 1e9 / 2 ** 30)
