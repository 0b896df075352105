"""Reading and writing Anima checkpoints from local files only (never a hub).

Two layouts:
  * a diffusers folder, as `AnimaModularPipeline.save_pretrained` writes it (the Anima-Base-v1.0-Diffusers layout):
        modular_model_index.json, transformer/, text_encoder/, text_conditioner/, vae/, tokenizer/, t5_tokenizer/
    The nano family uses the same layout with codec.json (the pixel-shuffle codec) in place of vae/.
  * ComfyUI split files: one diffusion-model file (DiT in the original Cosmos naming under `net.`, with the LLM
    adapter under `net.llm_adapter.`), one Qwen3 text-encoder file and one Qwen-Image VAE file; the tokenizers come
    from a local folder holding tokenizer/ and t5_tokenizer/. Key maps: `anima_lib.comfy_keys`.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

from . import comfy_keys
from .io import NonFiniteWeightsError, check_finite
from .networks import (ANIMA_2B_CONDITIONER, ANIMA_2B_TEXT_ENCODER, ANIMA_2B_TRANSFORMER, AnimaComponents,
                       PixelShuffleCodec, VAECodec, cast_floating)

COMPONENT_CLASSES = {
    "transformer": ("diffusers", "CosmosTransformer3DModel"),
    "text_encoder": ("transformers", "Qwen3Model"),
    "text_conditioner": ("diffusers", "AnimaTextConditioner"),
    "vae": ("diffusers", "AutoencoderKLQwenImage"),
    "tokenizer": ("transformers", "AutoTokenizer"),
    "t5_tokenizer": ("transformers", "AutoTokenizer"),
}
CODEC_FILE = "codec.json"


class CheckpointError(FileNotFoundError):
    """A checkpoint path or layout is wrong; the message names the path and what was expected."""


class NonFiniteCheckpointError(CheckpointError, NonFiniteWeightsError):
    """Checkpoint weights holding NaN/Inf; the message names the file or component and the tensor."""


def _check_finite(tensors: dict, source: str) -> dict:
    try:
        return check_finite(tensors, source)
    except NonFiniteWeightsError as exc:
        raise NonFiniteCheckpointError(str(exc)) from None


def _load_finite(path: Path) -> dict:
    return _check_finite(load_file(path), str(path))


def _require_dir(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{what}: no such local folder {path} (checkpoints are never downloaded)")
    return path


def load_diffusers_folder(path, torch_dtype: torch.dtype = torch.float32) -> AnimaComponents:
    root = _require_dir(path, "diffusers checkpoint")
    nano = (root / CODEC_FILE).is_file()
    needed = [n for n in COMPONENT_CLASSES if not (nano and n == "vae")]
    missing = [n for n in needed if not (root / n).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: missing component folder(s) {missing}; a diffusers Anima folder holds "
                              f"{list(COMPONENT_CLASSES)}" + (" (nano: codec.json instead of vae/)" if nano else ""))
    kwargs = dict(local_files_only=True, torch_dtype=torch_dtype)
    transformer = CosmosTransformer3DModel.from_pretrained(root / "transformer", **kwargs)
    conditioner = AnimaTextConditioner.from_pretrained(root / "text_conditioner", **kwargs)
    text_encoder = Qwen3Model.from_pretrained(root / "text_encoder", local_files_only=True, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    t5_tokenizer = AutoTokenizer.from_pretrained(root / "t5_tokenizer", local_files_only=True)
    if nano:
        codec_config = json.loads((root / CODEC_FILE).read_text())
        codec = PixelShuffleCodec(factor=codec_config["factor"])
        max_tokens = codec_config["max_tokens"]
    else:
        codec = VAECodec(AutoencoderKLQwenImage.from_pretrained(root / "vae", **kwargs))
        max_tokens = 512
    loaded = {"transformer": transformer, "text_conditioner": conditioner, "text_encoder": text_encoder}
    if not nano:
        loaded["vae"] = codec.vae
    for name, module in loaded.items():  # from_pretrained accepts NaN/Inf weights; refuse them by component and tensor
        _check_finite(module.state_dict(), f"{root / name} ({type(module).__name__})")
    return AnimaComponents(transformer=transformer, text_encoder=text_encoder, text_conditioner=conditioner,
                           tokenizer=tokenizer, t5_tokenizer=t5_tokenizer, codec=codec,
                           preset="nano" if nano else "anima-2b", max_tokens=max_tokens).eval()


def save_diffusers_folder(components: AnimaComponents, path) -> Path:
    """Write the diffusers layout; the folder appears under its name only when complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        components.transformer.save_pretrained(staging / "transformer", safe_serialization=True)
        components.text_conditioner.save_pretrained(staging / "text_conditioner", safe_serialization=True)
        components.text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
        components.tokenizer.save_pretrained(staging / "tokenizer")
        components.t5_tokenizer.save_pretrained(staging / "t5_tokenizer")
        index = {"_class_name": "AnimaModularPipeline", "_blocks_class_name": "AnimaAutoBlocks"}
        names = ["transformer", "text_encoder", "text_conditioner", "tokenizer", "t5_tokenizer"]
        if isinstance(components.codec, VAECodec):
            components.codec.vae.save_pretrained(staging / "vae", safe_serialization=True)
            names.append("vae")
        else:
            (staging / CODEC_FILE).write_text(json.dumps(
                {"type": "pixel_shuffle", "factor": components.codec.factor, "max_tokens": components.max_tokens}))
        for name in names:
            library, cls = COMPONENT_CLASSES[name]
            index[name] = [library, cls, {"subfolder": name}]
        (staging / "modular_model_index.json").write_text(json.dumps(index, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --- ComfyUI split files ----------------------------------------------------------------------------------------------

def _require_file(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what}: no such local file {path} (checkpoints are never downloaded)")
    return path


def _count(state: dict, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def transformer_config_from_state(state: dict) -> dict:
    """CosmosTransformer3DModel settings read off diffusers-named weights; non-shape settings are the real Anima's."""
    patch = ANIMA_2B_TRANSFORMER["patch_size"]
    patch_area = patch[0] * patch[1] * patch[2]
    hidden, patch_in = state["patch_embed.proj.weight"].shape
    head_dim = state["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
    return {**ANIMA_2B_TRANSFORMER,
            "in_channels": patch_in // patch_area - 1,  # minus the concatenated padding-mask channel
            "out_channels": state["proj_out.weight"].shape[0] // patch_area,
            "num_attention_heads": hidden // head_dim, "attention_head_dim": head_dim,
            "num_layers": _count(state, r"transformer_blocks\.(\d+)\."),
            "mlp_ratio": state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
            "text_embed_dim": state["transformer_blocks.0.attn2.to_k.weight"].shape[1],
            "adaln_lora_dim": state["transformer_blocks.0.norm1.linear_1.weight"].shape[0]}


def conditioner_config_from_state(state: dict) -> dict:
    vocab, target_dim = state["embed.weight"].shape
    model_dim = state["blocks.0.cross_attn.q_proj.weight"].shape[1]
    head_dim = state["blocks.0.cross_attn.q_norm.weight"].shape[0]
    return {**ANIMA_2B_CONDITIONER, "source_dim": state["blocks.0.cross_attn.k_proj.weight"].shape[1],
            "target_dim": target_dim, "model_dim": model_dim, "num_attention_heads": model_dim // head_dim,
            "num_layers": _count(state, r"blocks\.(\d+)\."), "target_vocab_size": vocab,
            "mlp_ratio": state["blocks.0.mlp.0.weight"].shape[0] / model_dim,
            "use_self_attention": "blocks.0.self_attn.q_proj.weight" in state}


def text_encoder_config_from_state(state: dict) -> dict:
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = state["layers.0.self_attn.q_norm.weight"].shape[0]
    return {**ANIMA_2B_TEXT_ENCODER, "vocab_size": vocab, "hidden_size": hidden, "head_dim": head_dim,
            "num_hidden_layers": _count(state, r"layers\.(\d+)\."),
            "num_attention_heads": state["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
            "num_key_value_heads": state["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
            "intermediate_size": state["layers.0.mlp.gate_proj.weight"].shape[0]}


def _load_strict(module_cls, config: dict, state: dict, what: str, torch_dtype):
    with init_empty_weights():
        module = module_cls(**config)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{what}: keys do not match {module_cls.__name__} "
                              f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")
    module.load_state_dict(state, assign=True)
    return cast_floating(module, torch_dtype)  # keeps the class's float32 modules in float32, as from_pretrained does


def load_comfy_split(diffusion_model_file, text_encoder_file, vae_file, tokenizer_dir,
                     torch_dtype: torch.dtype = torch.float32) -> AnimaComponents:
    """Anima from ComfyUI's split files (+ a local folder with tokenizer/ and t5_tokenizer/); a file holding NaN/Inf
    is refused (NonFiniteCheckpointError naming the file and the tensor)."""
    dit_path = _require_file(diffusion_model_file, "model.comfy_diffusion_model")
    te_path = _require_file(text_encoder_file, "model.comfy_text_encoder")
    vae_path = _require_file(vae_file, "model.comfy_vae")
    tok_root = _require_dir(tokenizer_dir, "model.tokenizer_dir")
    for sub in ("tokenizer", "t5_tokenizer"):
        _require_dir(tok_root / sub, f"model.tokenizer_dir/{sub}")
    transformer_state, conditioner_state = comfy_keys.split_diffusion_model(_load_finite(dit_path))
    if not conditioner_state:
        raise CheckpointError(f"{dit_path}: no llm_adapter.* keys; an Anima diffusion model carries its LLM adapter")
    transformer = _load_strict(CosmosTransformer3DModel, transformer_config_from_state(transformer_state),
                               transformer_state, str(dit_path), torch_dtype)
    conditioner = _load_strict(AnimaTextConditioner, conditioner_config_from_state(conditioner_state),
                               conditioner_state, f"{dit_path} (llm_adapter)", torch_dtype)
    te_state = comfy_keys.text_encoder_to_diffusers(_load_finite(te_path))
    text_encoder = _load_strict(lambda **c: Qwen3Model(Qwen3Config(**c)), text_encoder_config_from_state(te_state),
                                te_state, str(te_path), torch_dtype)
    vae_raw = _load_finite(vae_path)
    vae_config = comfy_keys.vae_config_from_comfy(vae_raw)
    vae_state = {comfy_keys.vae_key_to_diffusers(k, vae_config["num_res_blocks"]): v for k, v in vae_raw.items()}
    vae = _load_strict(AutoencoderKLQwenImage, vae_config, vae_state, str(vae_path), torch_dtype)
    for module in (transformer, conditioner, text_encoder, vae):  # init_empty_weights leaves buffers real
        assert not any(b.is_meta for b in module.buffers()), f"{type(module).__name__} kept a meta buffer"
    return AnimaComponents(transformer=transformer, text_encoder=text_encoder, text_conditioner=conditioner,
                           tokenizer=AutoTokenizer.from_pretrained(tok_root / "tokenizer", local_files_only=True),
                           t5_tokenizer=AutoTokenizer.from_pretrained(tok_root / "t5_tokenizer", local_files_only=True),
                           codec=VAECodec(vae), preset="anima-2b").eval()


def save_comfy_split(components: AnimaComponents, folder) -> dict[str, Path]:
    """Write ComfyUI-layout files (what the real release ships); returns the paths by parameter name."""
    if components.vae is None:
        raise ValueError("ComfyUI split files need a VAE (the nano pixel-shuffle codec has no weights)")
    folder = Path(folder)
    paths = {"comfy_diffusion_model": folder / "diffusion_models" / "anima.safetensors",
             "comfy_text_encoder": folder / "text_encoders" / "qwen_3_06b_base.safetensors",
             "comfy_vae": folder / "vae" / "qwen_image_vae.safetensors",
             "tokenizer_dir": folder / "tokenizers"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = lambda sd: {k: v.contiguous() for k, v in sd.items()}  # noqa: E731 - safetensors needs it
    save_file(contiguous(comfy_keys.join_diffusion_model(components.transformer.state_dict(),
                                                         components.text_conditioner.state_dict())),
              paths["comfy_diffusion_model"])
    save_file(contiguous(comfy_keys.text_encoder_to_comfy(components.text_encoder.state_dict())),
              paths["comfy_text_encoder"])
    nrb = components.vae.config.num_res_blocks
    save_file(contiguous({comfy_keys.vae_key_to_comfy(k, nrb): v for k, v in components.vae.state_dict().items()}),
              paths["comfy_vae"])
    components.tokenizer.save_pretrained(paths["tokenizer_dir"] / "tokenizer")
    components.t5_tokenizer.save_pretrained(paths["tokenizer_dir"] / "t5_tokenizer")
    return paths

