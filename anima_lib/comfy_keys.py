"""Key maps between ComfyUI's Anima split files and the diffusers/transformers modules, both directions.

Facts (diffusers scripts/convert_cosmos_to_diffusers.py, convert_anima_to_diffusers.py, ComfyUI, kohya sd-scripts):
  * diffusion model file: every key under `net.` (re-saved by ComfyUI: `model.diffusion_model.`); DiT keys in the
    original Cosmos naming; the LLM adapter under `llm_adapter.` with exactly AnimaTextConditioner's names.
    Only renames, no reshapes; training buffers (pos_embedder.*, accum_*, _extra_state) are dropped.
  * text encoder file (qwen_3_06b_base): transformers Qwen3Model keys with a `model.` prefix, no lm_head.
  * VAE file (qwen_image_vae): the original Wan VAE naming (encoder.downsamples.N.residual.K, decoder.upsamples.N, ...).
"""
from __future__ import annotations

import re

DIT_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")
ADAPTER_PREFIX = "llm_adapter."
# Applied in this order with str.replace (the order matters: adaLN names before self_attn/cross_attn).
DIT_RENAMES = (
    ("t_embedder.1", "time_embed.t_embedder"),
    ("t_embedding_norm", "time_embed.norm"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("output_proj", "to_out.0"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
)
DIT_DROPPED = ("accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration", "accum_train_in_hours",
               "pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range", "_extra_state")
TEXT_ENCODER_PREFIX = "model."


def _strip_dit_prefix(key: str) -> str:
    for prefix in DIT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    raise KeyError(f"{key!r}: not a ComfyUI Anima diffusion-model key (expected a prefix in {DIT_PREFIXES})")


def dit_key_to_diffusers(key: str) -> str:
    for old, new in DIT_RENAMES:
        key = key.replace(old, new)
    return key


def dit_key_to_comfy(key: str) -> str:
    for old, new in reversed(DIT_RENAMES):
        key = key.replace(new, old)
    return key


def split_diffusion_model(state: dict) -> tuple[dict, dict]:
    """ComfyUI diffusion-model state -> (CosmosTransformer3DModel state, AnimaTextConditioner state)."""
    transformer, conditioner = {}, {}
    for key, tensor in state.items():
        bare = _strip_dit_prefix(key)
        if bare.startswith(ADAPTER_PREFIX):  # split out first: the DiT renames would rewrite adapter names
            conditioner[bare[len(ADAPTER_PREFIX):]] = tensor
        elif not any(dropped in bare for dropped in DIT_DROPPED):
            transformer[dit_key_to_diffusers(bare)] = tensor
    return transformer, conditioner


def join_diffusion_model(transformer: dict, conditioner: dict) -> dict:
    state = {f"net.{dit_key_to_comfy(k)}": v for k, v in transformer.items()}
    state.update({f"net.{ADAPTER_PREFIX}{k}": v for k, v in conditioner.items()})
    return state


def text_encoder_to_diffusers(state: dict) -> dict:
    out = {}
    for key, tensor in state.items():
        if key.startswith("lm_head."):
            continue  # a causal-LM export: Anima uses the body only
        if not key.startswith(TEXT_ENCODER_PREFIX):
            raise KeyError(f"{key!r}: not a ComfyUI Qwen3 text-encoder key (expected the prefix 'model.')")
        out[key[len(TEXT_ENCODER_PREFIX):]] = tensor
    return out


def text_encoder_to_comfy(state: dict) -> dict:
    return {f"{TEXT_ENCODER_PREFIX}{k}": v for k, v in state.items()}


# --- Qwen-Image VAE: Wan naming <-> AutoencoderKLQwenImage ------------------------------------------------------------
_RESIDUAL = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_MIDDLE = (("middle.0.", "mid_block.resnets.0."), ("middle.1.", "mid_block.attentions.0."),
           ("middle.2.", "mid_block.resnets.1."))
_HEAD = (("head.0.", "norm_out."), ("head.2.", "conv_out."))


def _rename_parts(rest: str, to_diffusers: bool) -> str:
    """At most one rename per table (mid block, head, residual parts), in the direction asked."""
    for table in (_MIDDLE, _HEAD, _RESIDUAL):
        for wan, diffusers in table:
            old, new = (wan, diffusers) if to_diffusers else (diffusers, wan)
            if old in rest:
                rest = rest.replace(old, new, 1)
                break
    return rest


def vae_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    if key.startswith("conv1."):
        return "quant_conv." + key[len("conv1."):]
    if key.startswith("conv2."):
        return "post_quant_conv." + key[len("conv2."):]
    side, _, rest = key.partition(".")
    if rest.startswith("conv1."):
        return f"{side}.conv_in.{rest[len('conv1.'):]}"
    stride = num_res_blocks + 2  # per decoder stage: num_res_blocks + 1 resnets, then one upsampler
    if m := re.match(r"downsamples\.(\d+)\.(.*)", rest):
        rest = f"down_blocks.{m[1]}.{m[2]}"
    elif m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
        stage, slot = divmod(int(m[1]), stride)
        rest = (f"up_blocks.{stage}.upsamplers.0.{m[2]}" if slot == num_res_blocks + 1
                else f"up_blocks.{stage}.resnets.{slot}.{m[2]}")
    return f"{side}.{_rename_parts(rest, to_diffusers=True)}"


def vae_key_to_comfy(key: str, num_res_blocks: int) -> str:
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv."):]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv."):]
    side, _, rest = key.partition(".")
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    stride = num_res_blocks + 2
    if m := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
        rest = f"downsamples.{m[1]}.{m[2]}"
    elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        rest = f"upsamples.{int(m[1]) * stride + num_res_blocks + 1}.{m[2]}"
    elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        rest = f"upsamples.{int(m[1]) * stride + int(m[2])}.{m[3]}"
    return f"{side}.{_rename_parts(rest, to_diffusers=False)}"


def vae_config_from_comfy(state: dict) -> dict:
    """AutoencoderKLQwenImage shape settings read off a Wan-named state dict (the rest stay at their defaults)."""
    base_dim = state["encoder.conv1.weight"].shape[0]
    entries = {int(m[1]) for k in state if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))}
    resamples = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample", k))})
    stages = len(resamples) + 1
    num_res_blocks = (len(entries) - len(resamples)) // stages
    dim_mult = [state[f"encoder.downsamples.{s * (num_res_blocks + 1)}.residual.6.weight"].shape[0] // base_dim
                for s in range(stages)]
    temporal = [f"encoder.downsamples.{i}.time_conv.weight" in state for i in resamples]
    return dict(base_dim=base_dim, z_dim=state["conv2.weight"].shape[0], dim_mult=dim_mult,
                num_res_blocks=num_res_blocks, temperal_downsample=temporal)
