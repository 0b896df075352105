"""GGML Q8_0: blocks of 32 weights along the input dimension, one fp16 scale + 32 int8 codes (34 bytes, 8.5 bits).

    amax = max|x| over the block, d = amax / 127, q = roundf(x / d) (half away from zero), stored d = fp16(d)
    dequantized x = q * float(d_fp16)
Quantization divides by the fp32 d and dequantization multiplies by the fp16 d, exactly as ggml / gguf-py do.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
BYTES_PER_BLOCK = 34


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] (cols % 32 == 0) -> (scales fp16 [rows, cols/32], codes int8 [rows, cols/32, 32])."""
    if weight.ndim != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"Q8_0 needs a 2-D weight whose row length is a multiple of {BLOCK} (got {tuple(weight.shape)})")
    blocks = weight.detach().float().reshape(weight.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    scaled = blocks * inv
    codes = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int8)  # roundf: half away from zero
    return d.squeeze(-1).to(torch.float16), codes


def dequantize(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (codes.float() * scales.float()[..., None]).reshape(codes.shape[0], -1)


def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the engine will see it after Q8_0, in the weight's own dtype."""
    return dequantize(*quantize(weight)).to(weight.dtype)


def to_ggml_bytes(scales: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
    """GGML block layout: per block the little-endian fp16 d, then 32 int8 codes -> uint8 [rows, cols/32*34]."""
    rows, n_blocks = scales.shape
    out = np.empty((rows, n_blocks, BYTES_PER_BLOCK), dtype=np.uint8)
    out[..., :2] = scales.numpy().astype("<f2").view(np.uint8).reshape(rows, n_blocks, 2)
    out[..., 2:] = codes.numpy().view(np.uint8)
    return out.reshape(rows, n_blocks * BYTES_PER_BLOCK)


def from_ggml_bytes(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, BYTES_PER_BLOCK)
    scales = torch.from_numpy(blocks[..., :2].copy().view("<f2").reshape(rows, -1).astype(np.float16))
    codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8))
    return scales, codes


@torch.no_grad()
def quantize_linears_(module: torch.nn.Module) -> dict[str, int]:
    """Replace every nn.Linear weight (row length a multiple of 32) by its Q8_0 value, in place; returns counts."""
    counts = {"quantized": 0, "kept": 0}
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Linear):
            if child.weight.shape[1] % BLOCK == 0:
                child.weight.copy_(fake_quantize(child.weight))
                counts["quantized"] += 1
            else:
                counts["kept"] += 1
    return counts


# --- the text encoder as GGUF (llama.cpp's qwen3 names, so candle's quantized_qwen3 reader can be reused) ------------

_QWEN3_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_tensor_name(hf_name: str) -> str:
    """transformers Qwen3Model state-dict name -> llama.cpp GGUF name (no LM head: a text encoder has none)."""
    if hf_name == "embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".")
    if parts[0] == "layers":
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        return f"blk.{parts[1]}.{_QWEN3_NAMES[module]}.{leaf}"
    raise KeyError(f"{hf_name}: no GGUF name for this Qwen3 tensor")


def write_text_encoder_gguf(text_encoder: torch.nn.Module, path, context_length: int = 512) -> dict:
    """Q8_0 for every 2-D weight whose rows divide into blocks of 32 (embedding included), F32 for norms; returns
    {"q8_0": n, "f32": n, "bytes": file size}. Readable by gguf-py's GGUFReader (tested)."""
    from pathlib import Path

    import gguf
    cfg = text_encoder.config
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_uint32("qwen3.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32("qwen3.attention.head_count_kv", cfg.num_key_value_heads)
    writer.add_uint32("qwen3.attention.key_length", cfg.head_dim)
    writer.add_uint32("qwen3.block_count", cfg.num_hidden_layers)
    writer.add_uint32("qwen3.embedding_length", cfg.hidden_size)
    writer.add_uint32("qwen3.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32("qwen3.context_length", context_length)
    writer.add_float32("qwen3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_float32("qwen3.rope.freq_base", float(getattr(cfg, "rope_theta", None) or 1e6))
    counts = {"q8_0": 0, "f32": 0}
    for name, tensor in text_encoder.state_dict().items():
        tensor = tensor.detach().float()
        if tensor.ndim == 2 and tensor.shape[1] % BLOCK == 0:
            raw = to_ggml_bytes(*quantize(tensor))
            writer.add_tensor(gguf_tensor_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            counts["q8_0"] += 1
        else:
            writer.add_tensor(gguf_tensor_name(name), tensor.numpy())
            counts["f32"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {**counts, "bytes": Path(path).stat().st_size}
