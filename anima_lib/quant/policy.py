"""Which layers stay in higher precision: measured, not assumed. Sensitivity of a layer = the cosine between the
model's output with only that layer quantized and the full-precision output, on real inputs (noised cache latents
at several times, real contexts). The policy is then data: the default format, with the most sensitive layers moved
to 8 bits and the small precision-critical ones kept (quantization.md §6).
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch

from .packed import QuantizedLinear, _set_module, resolve_policy


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@torch.no_grad()
def layer_sensitivity(model: torch.nn.Module, run: Callable[[torch.nn.Module], torch.Tensor], fmt: dict,
                      method: str = "rerround") -> dict[str, float]:
    """{layer: output cosine with only that Linear quantized to fmt} for every Linear that can take fmt."""
    reference = run(model)
    chosen, _ = resolve_policy(model, {**fmt, "layers": {}})
    out = {}
    for name in chosen:
        original = model.get_submodule(name)
        _set_module(model, name, QuantizedLinear.from_linear(original, method=method, **fmt))
        try:
            out[name] = _cosine(run(model), reference)
        finally:
            _set_module(model, name, original)
    return out


def policy_from_sensitivity(sensitivity: dict[str, float], base_policy: dict, threshold: float,
                            promote: dict | None = None) -> dict:
    """base_policy plus an 8-bit override for every layer whose single-layer cosine is below `threshold`."""
    promote = promote or {"bits": 8, "group_size": 32}
    layers = dict(base_policy.get("layers", {}))
    ruled = {name for name in sensitivity if any(fnmatch.fnmatchcase(name, pattern) for pattern in layers)}
    promoted = {name: promote for name, cos in sensitivity.items() if cos < threshold and name not in ruled}
    return {**base_policy, "layers": {**promoted, **layers}}
