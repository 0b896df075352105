"""What notebooks and stages call to get a run's Anima components: `models.load_components(params)`.

The preset decides the source: nano (random init, or the shipped / this run's retrained teacher), a diffusers folder,
or ComfyUI split files; every source is read at the run's dtype, so float32-kept modules (Cosmos'
learnable_pos_embed) stay float32 in bf16 runs without a cast after loading.

The nano teacher's files (a diffusers folder + a sha256 manifest) are written, verified and read here; training it
(`nano_world.teacher`, which needs the renderer) sits above this module, so a real run never imports the nano world.

The loading stack, each layer importing only the ones below it (tests/test_imports.py checks there is no circle):
    nano_world.teacher  training the nano teacher (renderer, flow matching)
    models              load_components, nano_teacher_folder, the teacher's files (+ `networks`' names, re-exported)
    checkpoints         diffusers folders and ComfyUI split files
    networks            the diffusers/transformers classes at nano and 2B sizes, AnimaComponents, the codecs
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoints import load_comfy_split, load_diffusers_folder, save_diffusers_folder
from .io import WeightsError, atomic_write_json, sha256_file
from .nano_world.prompts import vocabulary
from .networks import (  # noqa: F401 - re-exported: `models.X` is the name notebooks and stages use
    ANIMA_2B_CONDITIONER, ANIMA_2B_TEXT_ENCODER, ANIMA_2B_TRANSFORMER, ANIMA_2B_TRANSFORMER_PARAMS, ANIMA_2B_VAE,
    DTYPES, NANO_CODEC_FACTOR, NANO_CONDITIONER, NANO_MAX_TOKENS, NANO_TEXT_ENCODER, NANO_TRANSFORMER,
    AnimaComponents, PixelShuffleCodec, VAECodec, build_meta_anima_2b, build_nano, cast_floating, check_nano_prompts,
    count_parameters, device_of, encode_prompts, nano_tokenizer, randn, transformer_velocity, velocity_fn,
    weights_digest)

SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "nano_teacher"
MANIFEST = "manifest.json"
REGENERATE = "anima run params/nano.yaml --only 00_nano_teacher --set teacher.train=true"


def load_components(params) -> AnimaComponents:
    """What a notebook calls: the components a preset names, on its device and dtype, in eval mode."""
    if params.run.threads > 0:
        torch.set_num_threads(params.run.threads)
    m = params.model
    dtype = DTYPES[m.dtype]
    # every file is read at the run's dtype: a bf16 checkpoint is read as bf16, not as an fp32 copy first
    if m.preset == "nano" and m.nano_weights == "random":
        components = build_nano(vocabulary(), seed=params.run.seed)  # built, not loaded: .to below casts it
    elif m.preset == "nano":
        components = _load_nano_weights(params, dtype)
    elif m.diffusers_dir:
        components = load_diffusers_folder(m.diffusers_dir, torch_dtype=dtype)
    else:
        components = load_comfy_split(m.comfy_diffusion_model, m.comfy_text_encoder, m.comfy_vae, m.tokenizer_dir,
                                      torch_dtype=dtype)
    components.to(device=params.run.device, dtype=dtype)
    return components.eval()


def nano_teacher_folder(params):
    """Where the nano teacher of this run lives: the repo's shipped one, or this run's retrained one."""
    if params.model.nano_weights not in ("shipped", "random"):
        return params.model.nano_weights
    return params.output_path() / "nano_teacher" if params.teacher.train else SHIPPED_TEACHER


def _load_nano_weights(params, dtype: torch.dtype) -> AnimaComponents:
    folder = Path(nano_teacher_folder(params))
    if params.model.nano_weights == "shipped" and params.teacher.train and not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no retrained nano teacher; run notebook 00_nano_teacher first "
                                f"(teacher.train is true)")
    return load_teacher(folder, torch_dtype=dtype)


# --- the nano teacher's files ---------------------------------------------------------------------------------------

def save_teacher(components: AnimaComponents, folder: Path, manifest: dict) -> Path:
    """The teacher as a diffusers folder plus MANIFEST: `manifest` with every file's sha256 added."""
    folder = save_diffusers_folder(components, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "files": {str(p.relative_to(folder)): sha256_file(p) for p in files}}
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def verify_teacher(folder: Path = SHIPPED_TEACHER) -> dict:
    """Check every weight file against the manifest's sha256; a clear error says how to regenerate."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise WeightsError(f"{folder}: no {MANIFEST}; regenerate the nano teacher with `{REGENERATE}`")
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"{path}: missing; regenerate the nano teacher with `{REGENERATE}`")
        if sha256_file(path) != digest:
            raise WeightsError(f"{path}: sha256 does not match {MANIFEST} (corrupt or edited); "
                               f"regenerate the nano teacher with `{REGENERATE}` or restore it from git")
    return manifest


def load_teacher(folder: Path = SHIPPED_TEACHER,
                 torch_dtype: torch.dtype = torch.float32) -> AnimaComponents:
    """The verified teacher read at `torch_dtype` (float32-kept modules stay float32, as diffusers' loader does)."""
    verify_teacher(folder)
    return load_diffusers_folder(folder, torch_dtype=torch_dtype)
