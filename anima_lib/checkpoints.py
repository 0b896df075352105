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
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
from transformers import AutoTokenizer, Qwen3Model

from .models import AnimaComponents, PixelShuffleCodec, VAECodec

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
