"""Style LoRAs on the Anima DiT: adapters (peft through diffusers), flow-matching training, and files that diffusers
and ComfyUI load. (Style data and 06's survival experiment: lora_survival; 07's transfer to the student:
lora_transfer.)

A LoRA is a `LoraWeights`: per target Linear a down matrix A [r, in] and an up matrix B [out, r], one scale alpha / r.
`fused(transformer, [(lora, strength), ...])` returns a plain copy of the transformer with W + strength·scale·B·A in
place: what the samplers, quantization and the phone consume. Training puts a peft adapter on such a copy (the base
and any fused adapter frozen) and reads the adapter back out.

Files (one folder per LoRA, written atomically):
  pytorch_lora_weights.safetensors  diffusers keys "transformer.<module>.lora_{A,B}.weight" with rank/alpha metadata:
                                    a pipeline with AnimaLoraLoaderMixin loads it (`load_lora_weights(folder)`)
  comfy_lora.safetensors            ComfyUI keys "diffusion_model.<module>.lora_{A,B}.weight", scale folded into B
  manifest.json                     rank, alpha, what it was trained on and how, sha256 of both files
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers.loaders import AnimaLoraLoaderMixin

from . import comfy_keys, models
from .flow_training import FlowMatchingConfig, load_ema_into, train_flow_matching
from .io import NonFiniteWeightsError, atomic_replace_dir, atomic_write_json, check_finite, sha256_file

TARGET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                  "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFY_FILE = "comfy_lora.safetensors"
MANIFEST = "manifest.json"
TRAINING_ADAPTER = "learned"  # not "train": a ModuleDict key may not shadow nn.Module.train


class LoraError(ValueError):
    """A LoRA that does not fit the model (unmatched module names, wrong shapes, a rank the layers cannot hold)."""


class NonFiniteLoraError(LoraError, NonFiniteWeightsError):
    """A LoRA file holding NaN/Inf; the message names the file and the tensor (caught as either parent)."""


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
    from peft import LoraConfig, inject_adapter_in_model
    check_rank(transformer, rank)
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), init_lora_weights=True)

    def add():
        if hasattr(transformer, "add_adapter"):   # diffusers' PeftAdapterMixin: the DiT
            transformer.add_adapter(config, adapter_name=name)
        else:   # any torch module with target-named Linears (the 2-D toys of the transfer tests): peft itself
            inject_adapter_in_model(config, transformer, adapter_name=name)
    if seed is None:
        add()
        return
    device = models.device_of(transformer)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        add()


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


def adapter_training_config(params, section, uniform_fraction: float = 0.0) -> FlowMatchingConfig:
    """Flow-matching settings of an adapter (`params.lora` or `params.deturbo`): its steps, batch, lr, caption dropout
    and budget, at the teacher's training-time distribution; no weight decay (a LoRA starts at, and decays to, zero)."""
    teacher = params.teacher  # its logit-normal times (nano_world.teacher.teacher_config reads the same keys)
    return FlowMatchingConfig(steps=section.steps, batch_size=section.batch_size, lr=section.lr, warmup_steps=50,
                              weight_decay=0.0, ema_decay=0.99, caption_dropout=section.caption_dropout,
                              logit_mean=teacher.logit_mean, logit_std=teacher.logit_std,
                              uniform_fraction=uniform_fraction, checkpoint_every=section.checkpoint_every,
                              time_budget_s=section.minutes * 60, seed=params.run.seed)

