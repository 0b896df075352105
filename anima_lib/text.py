"""The text path (Qwen3 -> conditioner, exactly the context the DiT consumes) at the precisions the engine may run:

  f16   text encoder and conditioner weights and compute in float16
  bf16  the same in bfloat16
  q8_0  every Linear weight of the text encoder (Qwen3) as GGML Q8_0 (what the phone loads), the rest as float32
  f32   the reference
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from . import models
from .quant import q8_0

PRECISIONS = ("f32", "f16", "bf16", "q8_0")


def text_path_at(components: models.AnimaComponents, precision: str) -> models.AnimaComponents:
    """A copy of the components whose text encoder and conditioner run at `precision` (the DiT is shared)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: allowed {list(PRECISIONS)}")
    text_encoder = copy.deepcopy(components.text_encoder).float()
    conditioner = copy.deepcopy(components.text_conditioner).float()
    if precision == "q8_0":
        q8_0.quantize_linears_(text_encoder)
    elif precision != "f32":
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[precision]
        # not .to(dtype): diffusers logs a "should be kept in float32" notice on every such cast of the conditioner
        text_encoder, conditioner = models.cast_floating(text_encoder, dtype), models.cast_floating(conditioner, dtype)
    return dataclasses.replace(components, text_encoder=text_encoder, text_conditioner=conditioner)


@torch.no_grad()
def encode_all_precisions(components: models.AnimaComponents, prompts: list[str],
                          precisions=PRECISIONS) -> dict[str, torch.Tensor]:
    """{precision: context [B, L, D] float32}."""
    return {p: text_path_at(components, p).encode_prompts(prompts).float() for p in precisions}


def worst_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine over all (prompt, token) rows that are non-zero in either tensor (padding rows skipped)."""
    a2, b2 = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    live = (a2.abs().sum(1) > 0) | (b2.abs().sum(1) > 0)
    return float(torch.nn.functional.cosine_similarity(a2[live], b2[live], dim=1).min())
