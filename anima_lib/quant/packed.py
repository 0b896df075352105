"""A transformer quantized by a policy, run in PyTorch straight from packed tensors, and pre-packed checkpoints.

Policy (data, stored in the checkpoint config): a default {"bits", "group_size"} for Linear layers plus per-layer
entries, each either {"bits", "group_size"} (an override, as mlx-lm writes them) or "keep" (left in the checkpoint's
float dtype). A Linear whose row length does not divide by its group size is kept and listed, never crashed on.

Checkpoint folder (MLX layout, what the engine reads): model.safetensors with `<p>.weight` U32, `<p>.scales`,
`<p>.biases` (and `<p>.bias`) for quantized layers, every other tensor in `dtype`; config.json with the diffusers
transformer config, `quantization` / `quantization_config` (mlx-lm's keys) and `kept` (the layers left unquantized,
with the reason). Loading builds the module on the meta device and assigns the stored tensors: no full-precision
copy of a quantized layer ever exists.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..io import atomic_write_json, load_finite
from . import calibrated, mlx_affine

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class QuantizedLinear(torch.nn.Module):
    """y = x W^T + b with W = dequantize(weight, scales, biases) rebuilt per call (the CPU reference path)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, has_bias: bool,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        mlx_affine.check_format(bits, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        words = in_features * bits // 32
        self.register_buffer("weight", torch.empty(out_features, words, dtype=torch.uint32, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=dtype, device=device))
        self.register_buffer("biases", torch.empty(out_features, in_features // group_size, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if has_bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int, group_size: int, method: str = "rerround",
                    dtype: torch.dtype = torch.bfloat16, gram: Optional[calibrated.Gram] = None) -> "QuantizedLinear":
        """`gram`: the layer's calibration inputs, needed by the calibrated methods (calibrated.CALIBRATED)."""
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, dtype)
        words, scales, biases = calibrated.quantize_weight(linear.weight, group_size, bits, method, dtype, gram)
        layer.weight.copy_(words)
        layer.scales.copy_(scales)
        layer.biases.copy_(biases)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(dtype))
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mlx_affine.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put `module` at the dotted path `name` under `root` (replacing what was there)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def resolve_policy(model: torch.nn.Module, policy: dict) -> tuple[dict, dict]:
    """({layer: {"bits", "group_size"}} for every Linear to quantize, {layer: reason} for every Linear kept).

    policy = {"bits": 4, "group_size": 32, "layers": {pattern: "keep" | {"bits", "group_size"}}}; the first matching
    pattern (fnmatch on the module name) wins; unmatched Linears get the default.
    """
    default = {"bits": policy["bits"], "group_size": policy["group_size"]}
    mlx_affine.check_format(**default)
    chosen, kept = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        rule = next((r for pattern, r in policy.get("layers", {}).items() if fnmatch.fnmatchcase(name, pattern)), None)
        if rule == "keep":
            kept[name] = "policy"
            continue
        fmt = default if rule is None else {"bits": rule["bits"], "group_size": rule["group_size"]}
        mlx_affine.check_format(**fmt)
        if module.in_features % fmt["group_size"] or (module.in_features * fmt["bits"]) % 32:
            kept[name] = f"row length {module.in_features} not divisible by group_size {fmt['group_size']}"
            continue
        chosen[name] = fmt
    return chosen, kept


def quantize_model(model: torch.nn.Module, policy: dict, method: str = "rerround",
                   dtype: torch.dtype = torch.bfloat16,
                   calibration: Optional[dict[str, calibrated.Gram]] = None) -> tuple[torch.nn.Module, dict, dict]:
    """Replace the policy's Linears by QuantizedLinear in place; the rest of the model is cast to `dtype`.
    `calibration` ({layer: Gram} from calibrated.collect_grams on the unquantized model) is needed by awq and gptq;
    awq (and awq_gptq) first folds its activation-aware scales into the model (to_v rows / s, to_out columns × s)."""
    chosen, kept = resolve_policy(model, policy)
    grams = dict(calibration or {})
    if method in calibrated.CALIBRATED:
        missing = sorted(set(chosen) - set(grams))
        if missing:
            raise ValueError(f"method {method!r} needs calibration inputs for every quantized layer; none for "
                             f"{missing[:5]}")
        if method in calibrated.FOLDING:
            calibrated.fold_awq_scales(model, grams, chosen, dtype)
    for name, fmt in chosen.items():
        set_module(model, name, QuantizedLinear.from_linear(model.get_submodule(name), method=method, dtype=dtype,
                                                            gram=grams.get(name), **fmt))
    for module in model.modules():
        if not isinstance(module, QuantizedLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return model, chosen, kept


def mlx_quantization_config(policy: dict, chosen: dict) -> dict:
    """mlx-lm's `quantization` block: the default plus an entry for every layer that differs from it."""
    default = {"bits": policy["bits"], "group_size": policy["group_size"]}
    return {**{"group_size": default["group_size"], "bits": default["bits"], "mode": "affine"},
            **{name: fmt for name, fmt in chosen.items() if fmt != default}}


def save_packed(model: torch.nn.Module, folder: Path, policy: dict, chosen: dict, kept: dict,
                model_config: Optional[dict] = None) -> Path:
    """Write a quantized model (from quantize_model) as a pre-packed MLX-layout checkpoint, atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(tensors, tmp, metadata={"format": "mlx"})
    tmp.rename(folder / WEIGHTS)
    quantization = mlx_quantization_config(policy, chosen)
    atomic_write_json(folder / CONFIG, {"model_config": model_config or {}, "quantization": quantization,
                                        "quantization_config": quantization, "kept": kept, "policy": policy})
    return folder


def load_packed(folder: Path, build_model) -> torch.nn.Module:
    """Rebuild the model on the meta device from `build_model(model_config)`, swap in QuantizedLinear shells where
    the config says, and assign the stored tensors (packed words stay packed). Errors name the disagreeing layer;
    a NaN/Inf tensor raises io.NonFiniteWeightsError naming the file and the tensor."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    quantization = config["quantization"]
    default = {"bits": quantization["bits"], "group_size": quantization["group_size"]}
    with torch.device("meta"):
        model = build_model(config["model_config"])
    tensors = load_finite(folder / WEIGHTS)  # NaN/Inf scales, biases or kept weights: refused by name
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or f"{name}.scales" not in tensors:
            continue
        fmt = quantization.get(name, default)
        scales, words = tensors[f"{name}.scales"], tensors[f"{name}.weight"]
        expected_words = module.in_features * fmt["bits"] // 32
        if tuple(words.shape) != (module.out_features, expected_words) or \
                tuple(scales.shape) != (module.out_features, module.in_features // fmt["group_size"]):
            raise ValueError(f"{folder}: layer {name}: config says {fmt['bits']}-bit group {fmt['group_size']} for a "
                             f"{module.in_features}->{module.out_features} Linear, i.e. weight "
                             f"{(module.out_features, expected_words)} and scales "
                             f"{(module.out_features, module.in_features // fmt['group_size'])}; the file holds "
                             f"{tuple(words.shape)} and {tuple(scales.shape)}")
        set_module(model, name, QuantizedLinear(module.in_features, module.out_features, fmt["bits"],
                                                 fmt["group_size"], module.bias is not None, scales.dtype,
                                                 device="meta"))
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise ValueError(f"{folder}: tensors missing for {sorted(missing)[:5]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)
