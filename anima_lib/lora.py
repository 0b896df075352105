"""Style LoRAs on the Anima DiT: adapters (peft through diffusers), style data, flow-matching training, and files that
diffusers and ComfyUI load.

A LoRA is a `LoraWeights`: per target Linear a down matrix A [r, in] and an up matrix B [out, r], one scale alpha / r.
`fused(transformer, [(lora, strength), ...])` returns a plain copy of the transformer with W + strength·scale·B·A in
place: what the samplers, quantization and the phone consume. Training puts a peft adapter on such a copy (the base
and any fused adapter frozen) and reads the adapter back out.

Files (one folder per LoRA, written atomically):
  pytorch_lora_weights.safetensors  diffusers keys "transformer.<module>.lora_{A,B}.weight" with rank/alpha metadata:
                                    a pipeline with AnimaLoraLoaderMixin loads it (`load_lora_weights(folder)`)
  comfy_lora.safetensors            ComfyUI keys "diffusion_model.<module>.lora_{A,B}.weight", scale folded into B
  manifest.json                     rank, alpha, what it was trained on and how, sha256 of both files

Style data is a folder of images with same-name .txt captions (what LoRA trainers use), checked up front; the nano
preset writes one from the renderer's style mode.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from diffusers.loaders import AnimaLoraLoaderMixin

from . import comfy_keys, models
from .flow_matching import FlowMatchingConfig, load_ema_into, train_flow_matching
from .io import NonFiniteWeightsError, atomic_replace_dir, atomic_write_json, check_finite, sha256_file

TARGET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                  "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFY_FILE = "comfy_lora.safetensors"
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRAINING_ADAPTER = "learned"  # not "train": a ModuleDict key may not shadow nn.Module.train


class LoraError(ValueError):
    """A LoRA that does not fit the model (unmatched module names, wrong shapes, a rank the layers cannot hold)."""


class NonFiniteLoraError(LoraError, NonFiniteWeightsError):
    """A LoRA file holding NaN/Inf; the message names the file and the tensor (caught as either parent)."""


class StyleDataError(ValueError):
    """A style folder with unreadable images, missing or bad captions, or images of the wrong size."""


# --- the LoRA itself ---------------------------------------------------------------------------------------------------

@dataclass
class LoraWeights:
    down: dict[str, torch.Tensor]    # module name -> A [rank, in_features]
    up: dict[str, torch.Tensor]      # module name -> B [out_features, rank]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> torch.Tensor:
        return (self.up[module].double() @ self.down[module].double() * self.scale).float()

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.rank}:{self.alpha}".encode())
        for name in sorted(self.down):
            h.update(name.encode())
            h.update(self.down[name].float().numpy().tobytes())
            h.update(self.up[name].float().numpy().tobytes())
        return h.hexdigest()

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.down.values()) + sum(t.numel() for t in self.up.values())


def target_linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(TARGET_MODULES)}


def check_rank(transformer: torch.nn.Module, rank: int) -> None:
    narrowest = min(min(m.in_features, m.out_features) for m in target_linears(transformer).values())
    if not 1 <= rank <= narrowest:
        raise LoraError(f"LoRA rank {rank}: this model's narrowest target layer has {narrowest} features, so the rank "
                        f"must be between 1 and {narrowest}")


def check_pairs(down: dict, up: dict, source: str = "LoRA") -> None:
    """Each module's A [r, in] and B [out, r] are matrices of one rank r; else LoraError naming the modules and shapes
    (a rank mismatch would otherwise surface as torch's RuntimeError in the middle of fusing or loading)."""
    if set(down) != set(up):
        raise LoraError(f"{source}: modules with only one of lora_A/lora_B: {sorted(set(down) ^ set(up))[:12]}")
    bad = [f"{n}: lora_A {tuple(down[n].shape)} lora_B {tuple(up[n].shape)}" for n in sorted(down)
           if down[n].dim() != 2 or up[n].dim() != 2 or down[n].shape[0] != up[n].shape[1] or down[n].shape[0] < 1]
    if bad:
        raise LoraError(f"{source}: lora_A must be [rank, in] and lora_B [out, rank] with the same rank; "
                        f"{len(bad)} module(s) disagree: {bad[:6]}{' ...' if len(bad) > 6 else ''}")


def check_keys(transformer: torch.nn.Module, lora: LoraWeights) -> None:
    """Every module of the LoRA must be a target Linear of the model with matching shapes; else name them all."""
    check_pairs(lora.down, lora.up)
    linears = target_linears(transformer)
    unmatched = sorted(set(lora.down) - set(linears))
    if unmatched:
        raise LoraError(f"{len(unmatched)} LoRA modules do not match the model: {unmatched[:12]}"
                        f"{' ...' if len(unmatched) > 12 else ''}; the model's targets look like {sorted(linears)[:3]}")
    bad = [f"{n}: A {tuple(lora.down[n].shape)} B {tuple(lora.up[n].shape)} vs Linear {linears[n].in_features}->"
           f"{linears[n].out_features}" for n in sorted(lora.down)
           if lora.down[n].shape[1] != linears[n].in_features or lora.up[n].shape[0] != linears[n].out_features]
    if bad:
        raise LoraError(f"LoRA shapes do not match the model: {bad[:6]}")


@torch.no_grad()
def fused(transformer: torch.nn.Module, loras: list[tuple[LoraWeights, float]]) -> torch.nn.Module:
    """A copy of `transformer` with every (lora, strength) folded into its weights; the input is not touched."""
    for lora, _ in loras:  # every LoRA checked before any weight is touched
        check_keys(transformer, lora)
    out = copy.deepcopy(transformer)
    linears = target_linears(out)
    for lora, strength in loras:
        for name in lora.down:
            weight = linears[name].weight
            weight.copy_((weight.double() + strength * lora.delta(name).double()).to(weight.dtype))
    return out


def add_adapter(transformer: torch.nn.Module, rank: int, alpha: float, name: str = TRAINING_ADAPTER,
                seed: Optional[int] = None) -> None:
    """A trainable peft LoRA on the target linears; everything else frozen. peft draws lora_A's initial values from
    the global RNG, which torch seeds at random per process: with `seed`, they are drawn from that seed instead (and
    the global RNG is left as it was), so a LoRA trains to the same weights in every run."""
    from peft import LoraConfig
    check_rank(transformer, rank)
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), init_lora_weights=True)
    if seed is None:
        transformer.add_adapter(config, adapter_name=name)
        return
    device = models.device_of(transformer)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=name)


def _split_matrices(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """{"<prefix><module>.lora_A.weight": A, ...} -> ({module: A}, {module: B}) as float32 copies."""
    def pick(suffix):
        return {k[len(prefix):-len(suffix)]: v.detach().float().clone() for k, v in state.items() if k.endswith(suffix)}
    return pick(".lora_A.weight"), pick(".lora_B.weight")


def from_adapter(transformer: torch.nn.Module, rank: int, alpha: float, name: str = TRAINING_ADAPTER) -> LoraWeights:
    from peft.utils import get_peft_model_state_dict
    down, up = _split_matrices(get_peft_model_state_dict(transformer, adapter_name=name))
    return LoraWeights(down, up, rank, alpha)


@torch.no_grad()
def set_adapter(transformer: torch.nn.Module, lora: LoraWeights, name: str = TRAINING_ADAPTER) -> None:
    """Copy `lora` into the peft adapter `name` (same rank); used to start training from a given LoRA."""
    check_pairs(lora.down, lora.up)
    adapters = {n: m for n, m in transformer.named_modules() if n in lora.down and hasattr(m, "lora_A")}
    bad = [f"{n}: lora_A {tuple(lora.down[n].shape)} lora_B {tuple(lora.up[n].shape)} vs adapter lora_A "
           f"{tuple(m.lora_A[name].weight.shape)} lora_B {tuple(m.lora_B[name].weight.shape)}"
           for n, m in sorted(adapters.items())
           if lora.down[n].shape != m.lora_A[name].weight.shape or lora.up[n].shape != m.lora_B[name].weight.shape]
    if bad:
        raise LoraError(f"LoRA shapes do not match the adapter {name!r}: {bad[:6]}")
    for module_name, module in transformer.named_modules():
        if module_name in lora.down and hasattr(module, "lora_A"):
            module.lora_A[name].weight.copy_(lora.down[module_name] * (lora.scale / module.scaling[name]))
            module.lora_B[name].weight.copy_(lora.up[module_name])


# --- files -------------------------------------------------------------------------------------------------------------

def save_lora(lora: LoraWeights, folder: Path, manifest: dict) -> Path:
    """Write the diffusers file, the ComfyUI file and the manifest (with their sha256) as one atomic folder."""
    from safetensors.torch import save_file
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    diffusers_state, comfy_state = {}, {}
    for name in sorted(lora.down):
        diffusers_state[f"transformer.{name}.lora_A.weight"] = lora.down[name].contiguous()
        diffusers_state[f"transformer.{name}.lora_B.weight"] = lora.up[name].contiguous()
        comfy_name = f"diffusion_model.{comfy_keys.dit_key_to_comfy(name)}"
        comfy_state[f"{comfy_name}.lora_A.weight"] = lora.down[name].contiguous()
        comfy_state[f"{comfy_name}.lora_B.weight"] = (lora.up[name] * lora.scale).contiguous()  # alpha folded in
    metadata = {"transformer.r": lora.rank, "transformer.lora_alpha": lora.alpha,
                "transformer.target_modules": sorted(lora.down)}
    save_file(diffusers_state, staging / LORA_FILE,
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)})
    save_file(comfy_state, staging / COMFY_FILE, metadata={"format": "pt"})
    record = {**manifest, "rank": lora.rank, "alpha": lora.alpha, "modules": len(lora.down),
              "parameters": lora.num_parameters(), "lora_sha256": lora.digest(),
              "files": {f: sha256_file(staging / f) for f in (LORA_FILE, COMFY_FILE)}}
    atomic_write_json(staging / MANIFEST, record)
    return atomic_replace_dir(staging, folder)


def read_manifest(folder: Path) -> Optional[dict]:
    """The manifest of a complete, verified LoRA folder, or None (absent, partial or corrupt)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        ok = all(sha256_file(folder / f) == digest for f, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return None
    return manifest if ok else None


def read_lora(path) -> LoraWeights:
    """A LoRA from a folder written by save_lora (hash-verified) or a .safetensors file with diffusers or ComfyUI keys."""
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        if read_manifest(path) is None:
            raise LoraError(f"{path}: not a complete LoRA folder ({MANIFEST} missing or a file fails its sha256)")
        path = path / LORA_FILE
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    with safe_open(path, framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        try:  # the file's own tensor names (ComfyUI or diffusers keys), before diffusers converts them
            check_finite({k: f.get_tensor(k) for k in f.keys()}, str(path))
        except NonFiniteWeightsError as exc:
            raise NonFiniteLoraError(str(exc)) from None
    state = AnimaLoraLoaderMixin.lora_state_dict(str(path))  # diffusers' reader: ComfyUI keys become diffusers keys
    other = sorted(k for k in state if not k.startswith("transformer.") or not k.endswith((".lora_A.weight",
                                                                                          ".lora_B.weight")))
    if other:
        raise LoraError(f"{path}: keys that are not transformer LoRA matrices: {other[:12]}")
    down, up = _split_matrices(state, prefix="transformer.")
    if not down:
        raise LoraError(f"{path}: no lora_A/lora_B matrices")
    check_pairs(down, up, str(path))
    rank = next(iter(down.values())).shape[0]
    return LoraWeights(down, up, int(metadata.get("transformer.r", rank)), float(metadata.get("transformer.lora_alpha", rank)))


class _LoraPipeline(AnimaLoraLoaderMixin):
    """The smallest pipeline diffusers' AnimaLoraLoaderMixin.load_lora_weights works on: it loads into `.transformer`."""

    hf_device_map = None

    def __init__(self, transformer):
        self.transformer, self.text_conditioner = transformer, None

    @property
    def components(self):
        return {"transformer": self.transformer}


def load_with_diffusers(transformer: torch.nn.Module, path, adapter_name: str) -> None:
    """Load a LoRA as a peft adapter through diffusers' Anima loader (checked against the model first)."""
    check_keys(transformer, read_lora(path))
    _LoraPipeline(transformer).load_lora_weights(str(path), adapter_name=adapter_name)


# --- style data --------------------------------------------------------------------------------------------------------

def _list_problems(problems: list[str], folder: Path) -> str:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{folder}: {len(problems)} problem(s) in the style folder:\n  {shown}{more}"


def validate_style_folder(folder, image_size: int, check_caption: Optional[Callable[[str], Optional[str]]] = None
                          ) -> list[tuple[Path, str]]:
    """[(image path, caption)] of a style folder, or StyleDataError listing every problem at once: unreadable images,
    missing or empty captions, sizes other than image_size², captions `check_caption` rejects, captions without images."""
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise StyleDataError(f"{folder}: no such style folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise StyleDataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with same-name .txt captions")
    problems, items = [], []
    for path in images:
        caption_path = path.with_suffix(".txt")
        try:
            with Image.open(path) as img:
                img.load()
                size = img.size
        except Exception as exc:  # PIL raises many kinds for a broken file; all mean "unreadable"
            problems.append(f"{path.name}: unreadable image ({type(exc).__name__})")
            continue
        if size != (image_size, image_size):
            problems.append(f"{path.name}: size {size[0]}x{size[1]}, expected {image_size}x{image_size}")
        if not caption_path.is_file():
            problems.append(f"{path.name}: missing caption {caption_path.name}")
            continue
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            problems.append(f"{caption_path.name}: empty caption")
            continue
        problem = check_caption(caption) if check_caption is not None else None
        if problem:
            problems.append(f"{caption_path.name}: {problem}")
        items.append((path, caption))
    stems = {p.stem for p in images}
    problems += [f"{t.name}: caption without an image" for t in sorted(folder.glob("*.txt")) if t.stem not in stems]
    if problems:
        raise StyleDataError(_list_problems(problems, folder))
    return items


def load_style_folder(folder, image_size: int, check_caption=None) -> tuple[torch.Tensor, list[str]]:
    """uint8 images [N, 3, H, W] (RGB) and their captions, after validate_style_folder."""
    from PIL import Image
    items = validate_style_folder(folder, image_size, check_caption)
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p, _ in items]
    return torch.stack(images), [caption for _, caption in items]


def folder_digest(folder) -> str:
    """sha256 over the style folder's file names and bytes (identifies the dataset a LoRA was trained on)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def write_nano_style_folder(folder, n_images: int, seed: int, image_size: int = 32) -> Path:
    """The nano style dataset: creatures rendered in "our style" (n_images // 2 prompts x 2 jitter seeds) as PNG +
    caption files; written atomically, kept when already complete with the same settings."""
    from PIL import Image
    from .nano_world.prompts import sample_creatures
    from .nano_world.renderer import render
    folder = Path(folder)
    settings = {"n_images": n_images, "seed": seed, "image_size": image_size}
    if (folder / "dataset.json").is_file() and json.loads((folder / "dataset.json").read_text()) == settings:
        return folder
    staging = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    creatures = sample_creatures(max(1, n_images // 2), seed=seed)
    for i in range(n_images):
        creature = creatures[i // 2]
        Image.fromarray(render(creature, seed=10_000 + i, size=image_size, style=True)).save(staging / f"{i:05d}.png")
        (staging / f"{i:05d}.txt").write_text(creature.prompt() + "\n")
    (staging / "dataset.json").write_text(json.dumps(settings))
    return atomic_replace_dir(staging, folder)


# --- training ----------------------------------------------------------------------------------------------------------

def train_lora(base: torch.nn.Module, batches: Callable, empty_context: torch.Tensor, cfg: FlowMatchingConfig,
               rank: int, alpha: float, folder: Path, frozen: tuple = (), init: Optional[LoraWeights] = None,
               target_fn: Optional[Callable] = None, progress: bool = True, desc: str = "LoRA"
               ) -> tuple[LoraWeights, dict]:
    """Flow-matching training of a new LoRA on `base` with the `frozen` (lora, strength) pairs fused in.

    batches(step, generator) -> (x0 latents, context); target_fn: see flow_matching_loss (None = eps - x0).
    Resumable from folder/checkpoints; returns the EMA LoRA and {"step", "wall_s", "losses"}. `base` is not touched.
    """
    folder = Path(folder)
    trainee = fused(base, list(frozen)).float()
    add_adapter(trainee, rank, alpha, seed=cfg.seed)
    if init is not None:
        set_adapter(trainee, init)

    def velocity(x, sigma, context):
        return models.transformer_velocity(trainee, x, sigma, context)

    def log(record):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    modules = {"transformer": trainee}
    result = train_flow_matching(modules, velocity, batches, empty_context, cfg, folder / "checkpoints", log=log,
                                 progress=progress, target_fn=target_fn, desc=desc)
    load_ema_into(modules, folder / "checkpoints")
    return from_adapter(trainee, rank, alpha), result


def style_batches(images: torch.Tensor, contexts: torch.Tensor, codec, batch_size: int) -> Callable:
    """batches(step, generator) for train_lora: random style images (uint8) and their captions' contexts."""
    def batches(step, generator):
        pick = torch.randint(len(images), (batch_size,), generator=generator)
        device = contexts.device  # where the text path (and so the model) lives; the images stay on the host
        return codec.encode(images[pick].to(device).float() / 255), contexts[pick.to(device)]
    return batches


# --- what 06_lora_survival and the CLI call ----------------------------------------------------------------------------

WAYS = {"teacher": "trained on the teacher, applied to the student",
        "deturbo": "trained on student + De-Turbo adapter, applied to the student without it",
        "student": "trained directly on the student (the collapse baseline)"}
ROW_NAMES = {"teacher": "student+lora_teacher", "deturbo": "student+lora_deturbo", "student": "student+lora_student"}
KEY_EXCLUDED = ("minutes", "strength", "strengths", "ways", "checkpoint_every")  # do not change what a LoRA learns


def nano_caption_check(components) -> Optional[Callable[[str], Optional[str]]]:
    if components.preset != "nano":
        return None
    vocab = components.tokenizer.get_vocab()

    def check(caption: str) -> Optional[str]:
        unknown = sorted({w for w in caption.split() if w not in vocab})
        return f"words outside the nano vocabulary {unknown}" if unknown else None
    return check


def style_folder(params) -> Path:
    """The style data of this run: lora.style_folder, or (nano presets only) the nano renderer's style mode written
    under outputs/<run>. A real preset without lora.style_folder is a StyleDataError naming the key: renders of nano
    creatures are no style for a real model."""
    if params.lora.style_folder:
        from .config import _resolve
        return _resolve(params.lora.style_folder)
    if params.model.preset != "nano":
        raise StyleDataError(f"lora.style_folder is required with model.preset = {params.model.preset!r}: a folder "
                             f"of the studio's style images ({params.gate.image_size}x{params.gate.image_size}, PNG/"
                             f"JPEG) with same-name .txt captions (the nano renderer's style mode is not a style for a "
                             f"real model)")
    return write_nano_style_folder(params.output_path() / "style_data" / "nano", params.lora.style_images,
                                   seed=params.run.seed + 3_000, image_size=params.gate.image_size)


def load_style_data(params, components) -> tuple[torch.Tensor, list[str], Path]:
    """Images, captions and folder of the style data, validated before any training (errors list every problem)."""
    folder = style_folder(params)
    try:
        images, captions = load_style_folder(folder, params.gate.image_size, nano_caption_check(components))
    except StyleDataError as exc:
        hint = ""
        if components.preset == "nano" and "vocabulary" in str(exc):
            hint = f"\nnano vocabulary: {sorted(w for w in components.tokenizer.get_vocab() if not w.startswith('['))}"
        raise StyleDataError(f"{exc}{hint}\n(lora.style_folder: a folder of {params.gate.image_size}x"
                             f"{params.gate.image_size} images with same-name .txt captions)") from None
    return images, captions, folder


def adapter_training_config(params, section, uniform_fraction: float = 0.0) -> FlowMatchingConfig:
    """Flow-matching settings of an adapter (`params.lora` or `params.deturbo`): its steps, batch, lr, caption dropout
    and budget, at the teacher's training-time distribution; no weight decay (a LoRA starts at, and decays to, zero)."""
    teacher = params.teacher  # its logit-normal times (nano_world.teacher.teacher_config reads the same keys)
    return FlowMatchingConfig(steps=section.steps, batch_size=section.batch_size, lr=section.lr, warmup_steps=50,
                              weight_decay=0.0, ema_decay=0.99, caption_dropout=section.caption_dropout,
                              logit_mean=teacher.logit_mean, logit_std=teacher.logit_std,
                              uniform_fraction=uniform_fraction, checkpoint_every=section.checkpoint_every,
                              time_budget_s=section.minutes * 60, seed=params.run.seed)


def train_style_lora(params, components, way: str, student: torch.nn.Module,
                     deturbo_adapter: Optional[LoraWeights] = None, progress: bool = True) -> tuple[LoraWeights, dict]:
    """One style LoRA of 06 (`way` in WAYS), trained or found finished in outputs/<run>/lora/style-<key>/<way>
    (`deturbo-<adapter digest>` for the De-Turbo way).

    The key hashes everything that changes what the LoRA learns (data, base weights, adapter, rank, steps, ...), so
    an ad hoc run with other settings trains its own LoRAs next to the default ones.
    """
    from . import text
    if way not in WAYS:
        raise ValueError(f"way {way!r}: allowed {list(WAYS)}")
    if way == "deturbo" and deturbo_adapter is None:
        raise ValueError("way 'deturbo' needs the De-Turbo adapter (03_deturbo)")
    images, captions, folder = load_style_data(params, components)
    base = components.transformer if way == "teacher" else student
    frozen = ((deturbo_adapter, 1.0),) if way == "deturbo" else ()
    settings = {"way": way, "base_sha256": models.weights_digest(base),
                "adapter_sha256": deturbo_adapter.digest() if way == "deturbo" else None,
                "data_sha256": folder_digest(folder), "data_images": len(images),
                "text_precision": params.cache.precision,
                "lora": {k: getattr(params.lora, k) for k in params.lora.__dataclass_fields__ if k not in KEY_EXCLUDED}}
    shared = {"teacher": models.weights_digest(components.transformer), "student": models.weights_digest(student),
              **{k: settings[k] for k in ("data_sha256", "text_precision", "lora")}}  # the same for all three ways
    key = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:10]
    # the De-Turbo way also depends on the adapter: one folder per adapter, so another adapter never overwrites it
    folder_name = f"deturbo-{deturbo_adapter.digest()[:8]}" if way == "deturbo" else way
    out = params.output_path() / "lora" / f"style-{key}" / folder_name
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("settings") == settings and manifest.get("finished", True):
        return read_lora(out), manifest
    text_path = text.text_path_at(components, params.cache.precision)
    unique = sorted(set(captions))
    contexts = text_path.encode_prompts(unique).float()[[unique.index(c) for c in captions]]
    empty = text_path.encode_prompts([params.sampler.negative_prompt]).float()
    batches = style_batches(images, contexts, components.codec, params.lora.batch_size)
    lora, result = train_lora(base, batches, empty, adapter_training_config(params, params.lora), params.lora.rank,
                              params.lora.alpha, out.parent / f"{folder_name}-train", frozen=frozen, progress=progress,
                              desc=f"LoRA ({way})")
    losses = result["losses"][-50:]
    record = {"kind": "style", "settings": settings, "data_folder": str(folder), "steps": result["step"],
              "wall_s": result["wall_s"], "finished": result["step"] >= params.lora.steps,
              "final_loss": sum(losses) / max(1, len(losses)), "losses": result["losses"]}
    if result["paused"]:  # the time budget paused training: nothing half-trained is saved as the LoRA
        return lora, {**record, "parameters": lora.num_parameters()}
    save_lora(lora, out, record)
    return lora, read_manifest(out)


STYLE_TARGETS = {1: 0.8, 2: 0.8, 4: 0.9}   # issue 7: style score vs teacher+LoRA@20 at 1 (and 2) and 4 steps
CONTENT_TARGET, DIVERSITY_TARGET = 0.9, 0.8   # relative to the student's own rows (no LoRA), same step count


# The metric names of 06's survival table per evaluation world (anima_lib.worlds): style, content and diversity are
# compared as ratios; `distance` is to the styled reference's other seeds; `report` is copied into the table as found.
SURVIVAL_METRICS = {
    "nano": {"style": "style_score", "content": "attribute_alignment", "diversity": "diversity",
             "distance": "fd_probe_vs_reference", "distance_label": "fd_vs_ref", "distance_format": "{:.0f}",
             "report": ("clean_rate", "fd_probe_vs_reference")},
    "real": {"style": "style_clip", "content": "clip_score", "diversity": "diversity_clip",
             "distance": "fid_vs_reference", "distance_label": "fid_vs_ref", "distance_format": "{:.1f}",
             "report": ("fid_vs_reference",)},
}


def survival_table(rows: dict, reference_row: str, ways, steps, names: Optional[dict] = None) -> dict[str, dict]:
    """Per '<way>@<k>': style relative to the reference, content (nano: attribute_alignment, every prompt attribute
    read right however cleanly drawn; real: CLIP score) and diversity relative to the student's own row at k steps,
    whether all three meet the targets ("survives"), and, as found, the `report` metrics (nano: clean_rate and
    fd_probe_vs_reference). Rows as 06 writes them; `names`: SURVIVAL_METRICS of the world (default nano)."""
    names = names or SURVIVAL_METRICS["nano"]
    style, content, diversity = names["style"], names["content"], names["diversity"]
    reference = rows[reference_row][style]
    table = {}
    for way in ways:
        for k in steps:
            row, own = rows[f"{ROW_NAMES[way]}@{k}"], rows[f"student@{k}"]
            entry = {"style_ratio": row[style] / max(reference, 1e-9),
                     "content_ratio": row[content] / max(own[content], 1e-9),
                     "diversity_ratio": row[diversity] / max(own[diversity], 1e-9)}
            entry["survives"] = bool(entry["style_ratio"] >= STYLE_TARGETS[k] and entry["content_ratio"] >= CONTENT_TARGET
                                     and entry["diversity_ratio"] >= DIVERSITY_TARGET)
            entry.update({key: row[key] for key in names["report"]})
            table[f"{way}@{k}"] = entry
    return table


def survival_verdict(table: dict[str, dict], ways, steps, names: Optional[dict] = None) -> str:
    """One line: at which step counts style survives with which way, whether direct training collapses (and how), and
    how the teacher-LoRA transfer compares with De-Turbo."""
    names = names or SURVIVAL_METRICS["nano"]
    distance = names["distance"]

    def cells(way, key, fmt):
        return "/".join(fmt.format(table[f"{way}@{k}"][key]) for k in steps)

    def mean(way, key):
        return sum(table[f"{way}@{k}"][key] for k in steps) / len(steps)

    at = "/".join(map(str, steps))
    parts = []
    for way in ways:
        ok = [k for k in steps if table[f"{way}@{k}"]["survives"]]
        parts.append(f"{way}: {'survives at ' + '/'.join(map(str, ok)) + ' steps' if ok else 'does not survive'} "
                     f"(@{at}: style x{cells(way, 'style_ratio', '{:.2f}')}, content x"
                     f"{cells(way, 'content_ratio', '{:.2f}')}, diversity x{cells(way, 'diversity_ratio', '{:.2f}')}, "
                     f"{names['distance_label']} {cells(way, distance, names['distance_format'])})")
    if "student" in ways:
        how = []
        if any(table[f"student@{k}"]["diversity_ratio"] < DIVERSITY_TARGET for k in steps):
            how.append("diversity drops")
        if any(table[f"student@{k}"]["content_ratio"] < CONTENT_TARGET for k in steps):
            how.append("content drops")
        if "teacher" in ways and mean("student", distance) > 1.5 * mean("teacher", distance):
            how.append(f"its samples sit x{mean('student', distance) / mean('teacher', distance):.1f} "
                       f"farther from the styled reference than the teacher-LoRA's")
        parts.append("direct training: " + ("; ".join(how) if how else "no collapse seen"))
    if "teacher" in ways and "deturbo" in ways:
        style = {w: mean(w, "style_ratio") for w in ("teacher", "deturbo")}
        if abs(style["teacher"] - style["deturbo"]) <= 0.05:
            parts.append(f"the teacher-LoRA transfer is as good as De-Turbo on style (mean x{style['teacher']:.2f} vs "
                         f"x{style['deturbo']:.2f})")
        else:
            better = max(style, key=style.get)
            parts.append(f"{'De-Turbo' if better == 'deturbo' else 'the teacher-LoRA transfer'} carries more style "
                         f"(mean x{style['deturbo']:.2f} De-Turbo vs x{style['teacher']:.2f} teacher)")
    return "; ".join(parts)
