"""Calibration-aware MLX-affine quantization: the same (words, scales, biases) files, codes and parameters chosen with
the statistics of each layer's real inputs (quantization.md §0.5). Each layer's calibration (`Gram`) is Σ x_i² per
input channel and, where a method needs it, the full H = Σ x xᵀ over calibration tokens: the output error of a weight
error ΔW on those inputs is tr(ΔW H ΔWᵀ).

    awq   activation-aware: (1) where a Linear's input is the output of another Linear through operations that
          commute with a per-channel scale (attention: to_v -> softmax-weighted sum -> to_out), per-input-channel
          scales s are folded exactly into the weights — to_out's columns × s (then quantized), to_v's rows / s — with s
          = (mean x²)^(α/2), α searched per layer on the Gram-measured output error (α = 0: no scaling); (2) every
          layer's groups are fitted with each weight's error weighted by its input channel's mean square (the clip
          search of mlx_affine.search_params with importance). No new tensor: the engine reads the file unchanged.
    gptq  error feedback (GPTQ): columns are quantized left to right and each column's rounding error is pushed onto
          the columns not yet quantized through H⁻¹ (Cholesky form), so later codes compensate earlier ones; a group's
          (scale, bias) is fitted (clip search) on its columns as updated when the group is reached, stored in the
          file's dtype, and the codes are chosen with the stored values.
    awq_gptq  both: awq's scales folded first (the same exact transform), then every layer by gptq on the folded
          weights and the Grams of the scaled inputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from . import mlx_affine

METHODS = mlx_affine.METHODS + ("awq", "gptq", "awq_gptq")   # every way to choose codes and parameters; one format
CALIBRATED = ("awq", "gptq", "awq_gptq")                     # ... of which these need each layer's calibration
FOLDING = ("awq", "awq_gptq")                                # ... of which these fold awq's scales in first
AWQ_ALPHAS = tuple(i / 10 for i in range(11))   # the scale exponents tried per foldable layer (0 = no scaling)
GPTQ_DAMP = 0.01                               # H + damp·mean(diag H)·I: keeps the Cholesky factor well defined
GPTQ_BLOCK = 128                               # columns updated lazily per block (a multiple of every group size)
# Attention processors whose value path is linear from to_v to to_out[0] (no norm, no RoPE on v): folding is exact
FOLDABLE_PROCESSORS = ("CosmosAttnProcessor2_0", "AttnProcessor2_0", "AttnProcessor")


@dataclass
class Gram:
    """Calibration statistics of one Linear's inputs over `count` rows: Σ x_i² per channel (`sum_sq`, float64) and,
    when collected in full, Σ x xᵀ (`sum_xxt`, float32 [in, in]: an 8192-wide input would take 0.5 GB in float64)."""
    sum_sq: torch.Tensor
    count: int
    sum_xxt: Optional[torch.Tensor] = None

    @property
    def full(self) -> bool:
        return self.sum_xxt is not None

    @property
    def hessian(self) -> torch.Tensor:
        """E[x xᵀ] in float64 (needs the full statistics)."""
        if self.sum_xxt is None:
            raise ValueError("this layer's calibration holds only the diagonal; collect it with full=True")
        return self.sum_xxt.double() / max(self.count, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x_i²] per input channel: the importance of that channel's weights."""
        return self.sum_sq / max(self.count, 1)

    def scaled(self, inverse_scale: torch.Tensor) -> "Gram":
        """The statistics of x / s (after folding a per-channel scale s into the producer of x)."""
        d = inverse_scale.to(self.sum_sq)
        full = None if self.sum_xxt is None else self.sum_xxt * (d[:, None] * d[None, :]).to(self.sum_xxt)
        return Gram(self.sum_sq * d * d, self.count, full)


@torch.no_grad()
def collect_grams(model: torch.nn.Module, run: Callable[[torch.nn.Module], object], layers: Iterable[str],
                  full: Optional[Iterable[str]] = None) -> dict[str, Gram]:
    """{layer: Gram of its inputs} over everything `run(model)` feeds the model (one pass, full precision). Layers in
    `full` (default: all) get Σ x xᵀ too (gptq needs it everywhere, awq for the layers it folds a scale into); the
    others only the per-channel Σ x², so a 2B model's calibration stays small."""
    layers = list(layers)
    full = set(layers if full is None else full)
    grams: dict[str, Gram] = {}
    hooks = []

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq, xtx = (x * x).sum(0).double(), (x.T @ x if name in full else None)
            g = grams.get(name)
            if g is None:
                grams[name] = Gram(sq, x.shape[0], xtx)
            else:
                grams[name] = Gram(g.sum_sq + sq, g.count + x.shape[0], None if xtx is None else g.sum_xxt + xtx)
        return hook

    for name in layers:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(layers) - set(grams))
    if missing:
        raise ValueError(f"calibration never reached {missing[:5]}: the run does not call these layers")
    return grams


def full_statistics_for(model: torch.nn.Module, method: str, layers: Iterable[str]) -> list[str]:
    """The layers whose full Σ x xᵀ `method` needs: every layer for gptq (and awq_gptq), the fold consumers for awq,
    none else."""
    layers = list(layers)
    if method in ("gptq", "awq_gptq"):
        return layers
    if method == "awq":
        consumers = {consumer for _, consumer in fold_pairs(model)}
        return [n for n in layers if n in consumers]
    return []


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: Gram) -> float:
    """Mean over calibration rows of ‖x Wᵀ − x Ŵᵀ‖²: tr(ΔW H ΔWᵀ)."""
    delta = (weight.double() - approx.double())
    return float(((delta @ gram.hessian) * delta).sum())


def _pack_result(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, shape, bits: int, dtype):
    return mlx_affine.pack(codes.reshape(shape), bits), scale[..., 0].to(dtype), bias[..., 0].to(dtype)


def weighted_quantize(weight: torch.Tensor, importance: torch.Tensor, group_size: int, bits: int,
                      dtype: torch.dtype = torch.bfloat16):
    """The activation-weighted fit: clip search + refit with each weight's error × its input channel's importance."""
    mlx_affine.check_format(bits, group_size)
    groups = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    scale, bias = mlx_affine.search_params(groups, bits, dtype,
                                           importance.float().reshape(-1, group_size).clamp_min(1e-12))
    return _pack_result(mlx_affine.codes_for(groups, scale, bias, bits), scale, bias, weight.shape, bits, dtype)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, gram: Gram, group_size: int, bits: int, dtype: torch.dtype = torch.bfloat16,
                  damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK):
    """GPTQ with MLX-affine groups -> (words, scales, biases) in the file's layout."""
    mlx_affine.check_format(bits, group_size)
    if block % group_size:
        raise ValueError(f"block {block} must be a multiple of group_size {group_size}")
    w = weight.detach().double().clone()
    if not gram.full:
        raise ValueError("gptq needs the full input statistics of every layer it quantizes (collect_grams full=...)")
    rows, cols = w.shape
    h = gram.hessian.to(w.device)
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0                           # inputs never active in calibration: no error to spread from them
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    h_inv_upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    n_groups = cols // group_size
    codes = torch.zeros(rows, cols, dtype=torch.float64, device=w.device)
    scales = torch.zeros(rows, n_groups, 1, dtype=torch.float32, device=w.device)
    biases = torch.zeros(rows, n_groups, 1, dtype=torch.float32, device=w.device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block = w[:, start:end].clone()
        errors = torch.zeros(rows, end - start, dtype=torch.float64, device=w.device)
        u_block = h_inv_upper[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:             # the group's parameters from its columns as updated so far
                g = col // group_size
                group = w_block[:, i:i + group_size].float()[:, None, :]
                scale, bias = mlx_affine.search_params(group, bits, dtype)
                scales[:, g], biases[:, g] = scale[:, 0], bias[:, 0]
            s, b = scales[:, col // group_size, 0].double(), biases[:, col // group_size, 0].double()
            q = torch.clamp(torch.round((w_block[:, i] - b) / s), 0, 2 ** bits - 1)
            codes[:, col] = q
            err = (w_block[:, i] - (q * s + b)) / u_block[i, i]
            w_block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv_upper[start:end, end:]
    return _pack_result(codes, scales, biases, weight.shape, bits, dtype)


def fold_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(producer, consumer) Linear pairs whose connection commutes with a per-channel scale: (attn.to_v,
    attn.to_out.0) of every attention module with a known processor and no bias on to_v."""
    pairs = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        to_v, to_out = getattr(module, "to_v", None), getattr(module, "to_out", None)
        if processor is None or type(processor).__name__ not in FOLDABLE_PROCESSORS:
            continue
        if isinstance(to_v, torch.nn.Linear) and to_v.bias is None and to_out is not None \
                and isinstance(to_out[0], torch.nn.Linear) and to_v.out_features == to_out[0].in_features:
            prefix = f"{name}." if name else ""
            pairs.append((f"{prefix}to_v", f"{prefix}to_out.0"))
    return pairs


def awq_scale(weight: torch.Tensor, gram: Gram, group_size: int, bits: int, dtype: torch.dtype = torch.bfloat16,
              alphas=AWQ_ALPHAS) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale s = m^α / sqrt(max·min) (m = RMS of the channel) whose quantized Ŵ = Q(W·s)/s has
    the lowest calibration output error -> (s, α, error)."""
    rms = gram.mean_square.float().clamp_min(1e-12).sqrt()
    best = None
    for alpha in alphas:
        s = rms ** alpha
        s = s / (s.max() * s.min()).sqrt()
        scaled = weight.float() * s[None, :]
        deq = mlx_affine.dequantize(*weighted_quantize(scaled, gram.mean_square / s.double() ** 2, group_size, bits,
                                                       dtype), group_size, bits, torch.float32)
        err = output_error(weight, deq / s[None, :], gram)
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best


@torch.no_grad()
def fold_awq_scales(model: torch.nn.Module, grams: dict[str, Gram], formats: dict[str, dict],
                    dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Fold the best activation-aware scale of every foldable consumer that `formats` quantizes, in place (the
    full-precision function is unchanged up to rounding); `grams` of the consumers are replaced by those of x / s.
    Returns {consumer: chosen α}."""
    chosen = {}
    for producer, consumer in fold_pairs(model):
        if consumer not in formats or consumer not in grams:
            continue
        if not grams[consumer].full:
            raise ValueError(f"awq folds a scale into {consumer}: its calibration needs the full input statistics "
                             f"(collect_grams full=full_statistics_for(model, 'awq', layers))")
        out_layer, in_layer = model.get_submodule(consumer), model.get_submodule(producer)
        s, alpha, _ = awq_scale(out_layer.weight, grams[consumer], dtype=dtype, **formats[consumer])
        chosen[consumer] = alpha
        if alpha == 0:
            continue
        out_layer.weight.mul_(s.to(out_layer.weight.dtype)[None, :])
        in_layer.weight.div_(s.to(in_layer.weight.dtype)[:, None])
        grams[consumer] = grams[consumer].scaled(1.0 / s)
    return chosen


def quantize_weight(weight: torch.Tensor, group_size: int, bits: int, method: str,
                    dtype: torch.dtype = torch.bfloat16, gram: Gram | None = None):
    """One Linear weight, stored as `dtype` first (what the model holds), -> (words, scales, biases) by `method`.
    For awq this is the weighted fit only: its scale fold is a two-layer transform (fold_awq_scales) done before."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: allowed {list(METHODS)}")
    weight = weight.detach().to(dtype)
    if method in mlx_affine.METHODS:
        return mlx_affine.quantize(weight, group_size, bits, method)
    if gram is None:
        raise ValueError(f"method {method!r} needs calibration inputs (a Gram) for every layer it quantizes")
    if method == "awq":
        return weighted_quantize(weight, gram.mean_square, group_size, bits, dtype)
    return gptq_quantize(weight, gram, group_size, bits, dtype)


def awq_folded(model: torch.nn.Module, grams: dict[str, Gram], formats: dict[str, dict],
               dtype: torch.dtype = torch.bfloat16) -> tuple[torch.nn.Module, dict[str, Gram]]:
    """A copy of `model` with awq's scales folded in (the same full-precision function) and the Grams of its inputs:
    where awq's per-layer effects are measured (quantizing one of its layers there is what quantize_model does)."""
    folded, folded_grams = copy.deepcopy(model), dict(grams)
    fold_awq_scales(folded, folded_grams, formats, dtype)
    return folded, folded_grams
