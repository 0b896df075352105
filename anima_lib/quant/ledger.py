"""The memory ledger for the real Anima: exact bytes per component under each format, from the real configs on the
meta device (no weights needed). GB = 1e9 bytes and GiB = 2^30 bytes are kept apart everywhere.

Formats: "bf16" (2 B/param), MLX affine {"bits", "group_size"} with bf16 scales and biases (bits + 32/gs bits per
weight), GGML "q8_0" (34 B per 32 weights) and "q4_0" (18 B per 32). A Linear that a format cannot take (row length
not divisible) is counted at bf16, as the writers keep it; every non-Linear tensor (norms, embeddings tables unless
the format handles them, biases) is bf16.
"""
from __future__ import annotations

import re

import torch

from ..networks import ANIMA_2B_TRANSFORMER, build_meta_anima_2b
from .packed import resolve_policy

GB, GIB = 1e9, 2 ** 30
GGML_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
PARTS = ("transformer", "text_encoder", "text_conditioner", "vae_decoder")
ANIMA_2B_BLOCKS = ANIMA_2B_TRANSFORMER["num_layers"]   # transformer blocks of the real DiT
_BLOCK_RULE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")

# The DiT policy: embedders, time path and final layer stay bf16; the low-rank adaLN modulation goes to 8 bits;
# every other Linear in the blocks (attention, cross-attention, MLP) is 4-bit group 32 (quantization.md §6).
DIT_POLICY = {"bits": 4, "group_size": 32, "layers": {
    "patch_embed.*": "keep", "time_embed.*": "keep", "norm_out.*": "keep", "proj_out": "keep",
    "transformer_blocks.*.norm*.linear_*": {"bits": 8, "group_size": 32}}}


def _mlx_bytes(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    return out_f * in_f * bits // 8 + out_f * (in_f // group_size) * 2 * 2


def module_bytes(module: torch.nn.Module, fmt) -> dict:
    """{"bytes", "params", "quantized_params"} of a module with every eligible Linear (and, for GGML formats, the
    embedding table) in `fmt` and the rest in bf16. `fmt` is "bf16", "q8_0", "q4_0" or an MLX policy dict."""
    total_params = sum(p.numel() for p in module.parameters())
    quantized = {}
    if isinstance(fmt, dict):
        chosen, _ = resolve_policy(module, fmt)
        for name, f in chosen.items():
            lin = module.get_submodule(name)
            quantized[name + ".weight"] = (lin.weight.numel(), _mlx_bytes(lin.out_features, lin.in_features, **f))
    elif fmt in GGML_BLOCK_BYTES:
        for name, sub in module.named_modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Embedding)) and sub.weight.shape[-1] % 32 == 0:
                quantized[name + ".weight"] = (sub.weight.numel(), sub.weight.numel() // 32 * GGML_BLOCK_BYTES[fmt])
    elif fmt != "bf16":
        raise ValueError(f"format {fmt!r}: allowed 'bf16', 'q8_0', 'q4_0' or an MLX policy dict")
    q_params = sum(n for n, _ in quantized.values())
    q_bytes = sum(b for _, b in quantized.values())
    return {"bytes": q_bytes + 2 * (total_params - q_params), "params": total_params, "quantized_params": q_params}


def vae_decoder(vae: torch.nn.Module) -> torch.nn.Module:
    """Text-to-image on the phone needs only the decoder half of the VAE."""
    return torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})


def anima_ledger(scenarios: dict[str, dict]) -> dict[str, dict]:
    """scenarios: {name: {"transformer": fmt, "text_encoder": fmt, "text_conditioner": fmt, "vae_decoder": fmt}}
    -> {name: {component: bytes, ..., "total_GB", "total_GiB"}} for the real Anima configs (meta device)."""
    meta = build_meta_anima_2b()
    parts = {"transformer": meta["transformer"], "text_encoder": meta["text_encoder"],
             "text_conditioner": meta["text_conditioner"], "vae_decoder": vae_decoder(meta["vae"])}
    out = {}
    for name, formats in scenarios.items():
        row = {component: module_bytes(module, formats[component])["bytes"] for component, module in parts.items()}
        total = sum(row.values())
        out[name] = {**row, "total_GB": total / GB, "total_GiB": total / GIB}
    return out


def policy_for_blocks(policy: dict, from_blocks: int, to_blocks: int) -> dict:
    """A policy measured on a `from_blocks`-block DiT applied to a `to_blocks`-block one: a rule for block i (a
    measured per-layer override) covers the blocks at the same relative depth, [i·to/from, (i+1)·to/from); patterns
    without a block number are kept as they are."""
    layers = {}
    for pattern, rule in policy.get("layers", {}).items():
        match = _BLOCK_RULE.match(pattern)
        if match is None:
            layers[pattern] = rule
            continue
        i = int(match.group(1))
        for j in range(i * to_blocks // from_blocks, (i + 1) * to_blocks // from_blocks):
            layers[f"transformer_blocks.{j}.{match.group(2)}"] = rule
    return {**policy, "layers": layers}


PLANNED = "planned: DiT 4-bit g32 policy, TE Q8_0"
SCENARIOS = {
    "all bf16": {"transformer": "bf16", "text_encoder": "bf16", "text_conditioner": "bf16", "vae_decoder": "bf16"},
    PLANNED: {
        "transformer": DIT_POLICY, "text_encoder": "q8_0", "text_conditioner": "q8_0", "vae_decoder": "bf16"},
    "DiT 4-bit g64 policy, TE Q8_0": {
        "transformer": {**DIT_POLICY, "group_size": 64}, "text_encoder": "q8_0", "text_conditioner": "q8_0",
        "vae_decoder": "bf16"},
    "DiT 4-bit g32 policy, TE Q4_0": {
        "transformer": DIT_POLICY, "text_encoder": "q4_0", "text_conditioner": "q8_0", "vae_decoder": "bf16"},
    "DiT mixed 3/4-bit (MLP 3-bit), TE Q8_0": {
        "transformer": {**DIT_POLICY, "layers": {**DIT_POLICY["layers"],
                                                 "transformer_blocks.*.ff.*": {"bits": 3, "group_size": 32}}},
        "text_encoder": "q8_0", "text_conditioner": "q8_0", "vae_decoder": "bf16"},
    "DiT 3-bit g32 policy, TE Q4_0": {
        "transformer": {**DIT_POLICY, "bits": 3}, "text_encoder": "q4_0", "text_conditioner": "q8_0",
        "vae_decoder": "bf16"},
}


def planned_total_gb(transformer_policy: dict, nano_blocks: int) -> float:
    """The planned Anima's weights (GB) with the DiT under `transformer_policy` (measured on a `nano_blocks`-block DiT,
    carried to the 2B blocks by policy_for_blocks) and the rest as planned."""
    scenario = {**SCENARIOS[PLANNED], "transformer": policy_for_blocks(transformer_policy, nano_blocks, ANIMA_2B_BLOCKS)}
    return anima_ledger({"policy": scenario})["policy"]["total_GB"]
