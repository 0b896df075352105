from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from anima_lib.quant import q8_0

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "quant"


def test_bit_identical_to_gguf_py():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    w[3, :32] = 0.0                       # an all-zero block
    w[5, 7] = 1e4                         # an outlier
    w[6, :32] = torch.arange(32) - 15.5  # exact .5 ties after scaling
    ours = q8_0.to_ggml_bytes(*q8_0.quantize(w))
    theirs = gguf_quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    assert np.array_equal(q8_0.dequantize(*q8_0.quantize(w)).numpy(), gguf_dequantize(theirs, GGMLQuantizationType.Q8_0))


@pytest.mark.skipif(not (FIXTURES / "te_q8.gguf").is_file(), reason="golden files live in ../shared")
def test_golden_gguf_file():
    reader = GGUFReader(FIXTURES / "te_q8.gguf")
    tensor = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q8_0)
    expected = np.fromfile(FIXTURES / "q8.ref.f32", dtype="<f4")
    raw = np.asarray(tensor.data)
    decoded = q8_0.dequantize(*q8_0.from_ggml_bytes(raw)).numpy().ravel()
    assert np.array_equal(decoded, expected)
    # re-quantizing the decoded weights reproduces the stored bytes exactly
    again = q8_0.to_ggml_bytes(*q8_0.quantize(torch.from_numpy(decoded.reshape(raw.shape[0], -1))))
    assert np.array_equal(again, raw)


def test_error_level_and_bad_shapes():
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(1))
    rel = (q8_0.fake_quantize(w) - w).norm() / w.norm()
    assert 0.003 < rel < 0.008          # ~0.005 for Gaussian weights (quantization.md)
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_0.quantize(torch.randn(4, 30))
