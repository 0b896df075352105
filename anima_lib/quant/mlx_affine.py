"""MLX affine quantization (mlx.core.quantize, mode "affine"), bit-identical to MLX's CPU kernel, in PyTorch.

Spec: shared/research/quantization.md §1. Per group of `group_size` consecutive values along the last axis, in fp32:
    n = 2^bits - 1;  s0 = max((max - min) / n, 1e-7)
    edge, s = (min, +s0) if |min| > |max| else (max, -s0)        # the scale may be negative
    q0 = rint(edge / s);  s, bias = (edge / q0, edge) if q0 != 0 else (s, 0)
    q = clamp(rint((w - bias) / s), 0, n);  scales/biases are then cast to the weight's dtype
Dequantization: w = scale * q + bias. Codes are packed into uint32 as an LSB-first bit stream (4-bit: eight codes per
word, the first in the lowest bits; 3-bit: 32 codes in 3 words).

Two better-than-min-max options inside the same format (the file holds any (scale, bias, q)):
    rerround   re-choose q with the *stored* (dtype-cast) scale and bias
    search     per group, try shrinking the range (clip search) and refit scale/bias by least squares on the codes
"""
from __future__ import annotations

import torch

BITS = (3, 4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("minmax", "rerround", "search")


def check_format(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits}: supported {list(BITS)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: supported {list(GROUP_SIZES)}")


def affine_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLX's edge rule on fp32 groups [..., G, gs] -> (scale, bias) [..., G, 1] in fp32."""
    n_bins = 2 ** bits - 1
    w_max = groups.amax(-1, keepdim=True)
    w_min = groups.amin(-1, keepdim=True)
    s0 = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    use_min = w_min.abs() > w_max.abs()
    edge = torch.where(use_min, w_min, w_max)
    scale = torch.where(use_min, s0, -s0)
    q0 = torch.round(edge / scale)                     # torch.round is half-to-even, like rint
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / torch.where(nonzero, q0, torch.ones_like(q0)), scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    return scale, bias


def codes_for(groups: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round((groups - bias) / scale), 0, 2 ** bits - 1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., K] -> uint32 words [..., K*bits/32], LSB-first bit stream."""
    shape = codes.shape
    if (shape[-1] * bits) % 32:
        raise ValueError(f"row length {shape[-1]} x {bits} bits is not a whole number of uint32 words")
    c = codes.to(torch.int64).reshape(-1, shape[-1])
    if 32 % bits == 0:  # whole codes per word (4, 8 bits): one shift per code
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        words = (c.reshape(c.shape[0], -1, per_word) << shifts).sum(-1)
        return words.to(torch.uint32).reshape(*shape[:-1], shape[-1] * bits // 32)
    bit_index = torch.arange(bits, dtype=torch.int64)
    stream = ((c[..., None] >> bit_index) & 1).reshape(c.shape[0], -1, 32)          # [R, words, 32 bits]
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)
    return words.to(torch.uint32).reshape(*shape[:-1], shape[-1] * bits // 32)


def unpack(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """uint32 words [..., W] -> int64 codes [..., length]."""
    shape = words.shape
    w = words.to(torch.int64).reshape(-1, shape[-1]) & 0xFFFFFFFF
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        codes = ((w[..., None] >> shifts) & (2 ** bits - 1)).reshape(w.shape[0], -1)[:, :length]
        return codes.reshape(*shape[:-1], length)
    stream = ((w[..., None] >> torch.arange(32, dtype=torch.int64)) & 1).reshape(w.shape[0], -1)
    stream = stream[:, : length * bits].reshape(w.shape[0], length, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return codes.reshape(*shape[:-1], length)


def search_params(groups: torch.Tensor, bits: int, dtype: torch.dtype, importance: torch.Tensor | None = None,
                  shrink_steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip search: shrink the group's range toward its centre by up to 30%, keep the (scale, bias) pair with the
    lowest squared error after storing them in `dtype`, then refit scale/bias by least squares on the chosen codes.

    `importance` (broadcastable to groups, e.g. [gs] or [G, gs]: the mean square of each input channel over calibration
    activations) weights each weight's error, so the fit spends its levels where the layer's inputs are large (the
    activation-aware fit; None = every weight counts the same). Returns (scale, bias) [..., G, 1] as stored, in fp32."""
    n_bins = 2 ** bits - 1
    weight = torch.ones_like(groups) if importance is None else importance.float().expand_as(groups)
    best_err = best_scale = best_bias = None
    w_max, w_min = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)
    centre, half = (w_max + w_min) / 2, (w_max - w_min) / 2
    for k in range(shrink_steps + 1):
        ratio = 1.0 - 0.3 * k / shrink_steps
        lo, hi = centre - ratio * half, centre + ratio * half
        scale = torch.clamp((hi - lo) / n_bins, min=1e-7)
        bias = lo
        scale_s, bias_s = scale.to(dtype).float(), bias.to(dtype).float()
        q = codes_for(groups, scale_s, bias_s, bits)
        err = (weight * (q * scale_s + bias_s - groups) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_bias = err, scale_s, bias_s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale_s, best_scale)
            best_bias = torch.where(better, bias_s, best_bias)
    # (weighted) least-squares refit of (scale, bias) for the chosen codes, kept only where it helps after rounding
    q = codes_for(groups, best_scale, best_bias, bits)
    total = weight.sum(-1, keepdim=True).clamp_min(1e-30)
    q_mean, w_mean = (weight * q).sum(-1, keepdim=True) / total, (weight * groups).sum(-1, keepdim=True) / total
    var_q = (weight * (q - q_mean) ** 2).sum(-1, keepdim=True)
    fit_scale = torch.where(var_q > 0, (weight * (q - q_mean) * (groups - w_mean)).sum(-1, keepdim=True)
                            / var_q.clamp_min(1e-12), best_scale)
    fit_bias = w_mean - fit_scale * q_mean
    fit_scale_s, fit_bias_s = fit_scale.to(dtype).float(), fit_bias.to(dtype).float()
    q_fit = codes_for(groups, fit_scale_s, fit_bias_s, bits)
    fit_err = (weight * (q_fit * fit_scale_s + fit_bias_s - groups) ** 2).sum(-1, keepdim=True)
    better = fit_err < best_err
    return torch.where(better, fit_scale_s, best_scale), torch.where(better, fit_bias_s, best_bias)


def quantize(weight: torch.Tensor, group_size: int = 32, bits: int = 4, method: str = "minmax"):
    """weight [..., K] -> (words uint32 [..., K*bits/32], scales [..., K/gs], biases [..., K/gs]) in weight.dtype.

    method 'minmax' is exactly mlx.core.quantize (CPU); 'rerround' and 'search' write the same format with less error.
    """
    check_format(bits, group_size)
    if method not in METHODS:
        raise ValueError(f"method {method!r}: allowed {list(METHODS)}")
    if weight.ndim < 2 or weight.shape[-1] % group_size:
        raise ValueError(f"shape {tuple(weight.shape)}: the last axis must be a multiple of group_size={group_size}")
    dtype = weight.dtype
    groups = weight.float().reshape(*weight.shape[:-1], -1, group_size)
    if method == "search":
        scale_s, bias_s = search_params(groups, bits, dtype)
        codes = codes_for(groups, scale_s, bias_s, bits)
        scale, bias = scale_s, bias_s
    else:
        scale, bias = affine_params(groups, bits)
        codes = codes_for(groups, scale, bias, bits)
        if method == "rerround":
            codes = codes_for(groups, scale.to(dtype).float(), bias.to(dtype).float(), bits)
    words = pack(codes.reshape(weight.shape), bits)
    return words, scale[..., 0].to(dtype), bias[..., 0].to(dtype)


def dequantize(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int, bits: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """w = scale * q + bias, computed in fp32 and rounded once to `dtype` (default: the scales' dtype)."""
    length = scales.shape[-1] * group_size
    codes = unpack(words, bits, length).float().reshape(*scales.shape, group_size)
    w = codes * scales.float()[..., None] + biases.float()[..., None]
    return w.reshape(*scales.shape[:-1], length).to(dtype or scales.dtype)
