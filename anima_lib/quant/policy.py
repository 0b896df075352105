"""Which layers stay in higher precision: measured, not assumed. A layer's sensitivity is what happens to the model
when only that layer is quantized, everything else at full precision, on real inputs:

  output cosine   the cosine between the model's outputs and the full-precision outputs (world-agnostic);
  detail drop     how much the detail-strict reader's probability of the prompted eye count falls on the images the
                  model then samples (nano worlds: the finest detail, the first thing 4-bit loses; issue 20).

The policy is then data: the default format, with the most sensitive layers moved to 8 bits and the small
precision-critical ones kept (quantization.md §6).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, Optional

import torch

from .calibrated import Gram
from .packed import QuantizedLinear, resolve_policy, set_module

PROMOTED_FORMAT = {"bits": 8, "group_size": 32}   # where a sensitive layer goes


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def role_patterns(layers) -> list[str]:
    """One pattern per role of a transformer block ("transformer_blocks.*.attn2.to_v"): the units of a per-role
    measurement, which carry over to a DiT with any number of blocks."""
    return list(dict.fromkeys(re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.*.", n) for n in layers))


@torch.no_grad()
def unit_effects(model: torch.nn.Module, measure: Callable[[torch.nn.Module], object], fmt: dict,
                 method: str = "rerround", calibration: Optional[dict[str, Gram]] = None,
                 units: Optional[list[str]] = None) -> dict[str, object]:
    """{unit: measure(model with only that unit's Linears quantized to fmt)}. A unit is an fnmatch pattern over layer
    names (default: every Linear that can take fmt, each its own unit). With awq a layer gets its activation-weighted
    fit (its scale fold pairs two layers; quantize_model does it)."""
    chosen, _ = resolve_policy(model, {**fmt, "layers": {}})
    units = list(chosen) if units is None else units
    out = {}
    for unit in units:
        names = [n for n in chosen if fnmatch.fnmatchcase(n, unit)]
        if not names:
            raise ValueError(f"unit {unit!r} matches no Linear that can take {fmt}")
        originals = {n: model.get_submodule(n) for n in names}
        try:
            for name, original in originals.items():
                set_module(model, name, QuantizedLinear.from_linear(
                    original, method=method, gram=(calibration or {}).get(name), **fmt))
            out[unit] = measure(model)
        finally:
            for name, original in originals.items():
                set_module(model, name, original)
    return out


def layer_sensitivity(model: torch.nn.Module, run: Callable[[torch.nn.Module], torch.Tensor], fmt: dict,
                      method: str = "rerround", calibration: Optional[dict[str, Gram]] = None) -> dict[str, float]:
    """{layer: output cosine with only that Linear quantized to fmt} for every Linear that can take fmt."""
    with torch.no_grad():
        reference = run(model)
    return unit_effects(model, lambda m: _cosine(run(m), reference), fmt, method, calibration)


def detail_drop(model: torch.nn.Module, score: Callable[[torch.nn.Module], torch.Tensor], fmt: dict,
                method: str = "rerround", calibration: Optional[dict[str, Gram]] = None,
                units: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """{unit: per-image score(full precision) − score(only that unit quantized)}: `score` reads the detail of each
    image the model samples from fixed noise (higher is better), so a positive drop is detail that unit's quantization
    costs, paired image by image (the caller decides with an interval, not a bare mean: one role's effect is small)."""
    with torch.no_grad():
        reference = score(model)
    return {unit: reference - value
            for unit, value in unit_effects(model, score, fmt, method, calibration, units).items()}


def promote(base_policy: dict, layers, to: Optional[dict] = None) -> dict:
    """base_policy plus a `to` (default 8-bit g32) override for each of `layers` the base policy does not rule."""
    to = to or PROMOTED_FORMAT
    ruled = dict(base_policy.get("layers", {}))
    promoted = {name: to for name in layers if not any(fnmatch.fnmatchcase(name, p) for p in ruled)}
    return {**base_policy, "layers": {**promoted, **ruled}}


def policy_from_sensitivity(sensitivity: dict[str, float], base_policy: dict, threshold: float,
                            promote_to: dict | None = None) -> dict:
    """base_policy plus an 8-bit override for every layer whose single-layer cosine is below `threshold`."""
    return promote(base_policy, [name for name, cos in sensitivity.items() if cos < threshold], promote_to)


def policy_from_detail(drops: dict[str, float], base_policy: dict, threshold: float,
                       promote_to: dict | None = None, fits: Optional[Callable[[dict], bool]] = None) -> dict:
    """base_policy plus an 8-bit override for every unit (layer or pattern) whose detail drop exceeds `threshold`,
    the largest drops first; with `fits` (policy -> within the byte budget?), a unit that would break the budget is
    left at the default format."""
    policy = base_policy
    for unit, drop in sorted(drops.items(), key=lambda kv: -kv[1]):
        if drop <= threshold:
            break
        candidate = promote(policy, [unit], promote_to)
        if fits is None or fits(candidate):
            policy = candidate
    return policy
