"""Parity fixtures for the on-device engine: exact inputs and expected outputs of every stage the engine re-implements,
so its port can be checked number for number.

Folder layout (all tensors little-endian safetensors; `index.json` says what each holds):
    text.safetensors      qwen_ids / qwen_mask / t5_ids / t5_mask per prompt, context (the Q8_0 text path's output)
    dit.safetensors       one DiT forward of the quantized student: x, sigma, context -> velocity
    sampler_<k>.safetensors   the k-step student sampler (k = 1, 2, 4): every noise, and per step the network input x,
                          sigma, velocity and x0 estimate, then the final latent and the decoded image
    weights.safetensors   for a few quantized layers: packed words, scales, biases and the dequantized fp32 weight
The replay (`replay`) recomputes every output from the stored inputs with this repository's code and reports the
worst-row cosine of each; the gate (WORST_ROW_COSINE_GATE) is never lowered to pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import models, sampler, text
from .io import atomic_write_json, load_finite
from .quant import mlx_affine
from .quant.packed import QuantizedLinear
from .text import worst_row_cosine

WORST_ROW_COSINE_GATE = 0.9999
INDEX = "index.json"


def _latent_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] -> rows of C channels per pixel (the unit an engine compares)."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def _save(folder: Path, name: str, tensors: dict) -> dict:
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, folder / name)
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()}


@torch.no_grad()
def write(folder: Path, components: models.AnimaComponents, student: torch.nn.Module, prompts: list[str],
          params, steps=(1, 2, 4), seed: int = 1234, n_weight_layers: int = 3) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"what": "anima-distill parity fixtures", "gate": {"worst_row_cosine": WORST_ROW_COSINE_GATE},
             "conventions": "RF: x_s = (1-s) x0 + s eps, DiT(x, timestep=s, context) = eps - x0; student sampler: "
                            "sampler.consistency_sample (rCM, no CFG), TrigFlow times in `trig_times`",
             "prompts": prompts, "files": {}}
    q8 = text.text_path_at(components, "q8_0")
    qwen = components.tokenizer(prompts, padding="longest", return_tensors="pt")
    t5 = components.t5_tokenizer(prompts, padding="longest", return_tensors="pt")
    context = q8.encode_prompts(prompts).float()
    index["files"]["text.safetensors"] = _save(folder, "text.safetensors", {
        "qwen_ids": qwen.input_ids, "qwen_mask": qwen.attention_mask, "t5_ids": t5.input_ids,
        "t5_mask": t5.attention_mask, "context": context})

    velocity = models.velocity_fn(student)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(prompts), *components.latent_shape(params.gate.image_size))
    device = models.device_of(student)
    x = models.randn(shape, generator, device)
    sigma = torch.linspace(0.9, 0.1, len(prompts)).to(device)
    index["files"]["dit.safetensors"] = _save(folder, "dit.safetensors", {
        "x": x, "sigma": sigma, "context": context, "velocity": velocity(x, sigma, context)})
    for k in steps:
        noises = [models.randn(shape, generator, device) for _ in range(k)]
        trace: list = []
        final = sampler.student_sample(student, noises, context, params, trace=trace)
        tensors = {f"noise.{i}": n for i, n in enumerate(noises)}
        tensors["trig_times"] = torch.tensor(sampler.student_times(params, k), dtype=torch.float64)
        for i, step in enumerate(trace):
            tensors.update({f"step{i}.{key}": value for key, value in step.items()})
        tensors.update(final=final, image=components.codec.decode(final).float())
        index["files"][f"sampler_{k}.safetensors"] = _save(folder, f"sampler_{k}.safetensors", tensors)
    weights = {}
    quantized = [(n, m) for n, m in student.named_modules() if isinstance(m, QuantizedLinear)][:n_weight_layers]
    for name, layer in quantized:
        weights.update({f"{name}.weight": layer.weight, f"{name}.scales": layer.scales, f"{name}.biases": layer.biases,
                        f"{name}.dequantized": layer.dequantized_weight(torch.float32)})
        index.setdefault("weight_formats", {})[name] = {"bits": layer.bits, "group_size": layer.group_size}
    index["files"]["weights.safetensors"] = _save(folder, "weights.safetensors", weights)
    atomic_write_json(folder / INDEX, index)
    return index


@torch.no_grad()
def replay(folder: Path, components: models.AnimaComponents, student: torch.nn.Module) -> dict[str, float]:
    """Recompute every stored output from the stored inputs; {output: worst-row cosine}. A fixture file holding
    NaN/Inf is refused (io.NonFiniteWeightsError naming the file and the tensor) instead of scoring NaN cosines."""
    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    results = {}
    stored_text = load_finite(folder / "text.safetensors")
    context = text.text_path_at(components, "q8_0").encode_prompts(index["prompts"]).float()
    results["text.context"] = worst_row_cosine(context, stored_text["context"])

    velocity = models.velocity_fn(student)
    dit = load_finite(folder / "dit.safetensors")
    results["dit.velocity"] = worst_row_cosine(_latent_rows(velocity(dit["x"], dit["sigma"], dit["context"])),
                                               _latent_rows(dit["velocity"]))
    for name in sorted(index["files"]):
        if not name.startswith("sampler_"):
            continue
        stored = load_finite(folder / name)
        k = sum(1 for key in stored if key.startswith("noise."))
        trace: list = []
        final = sampler.consistency_sample(velocity, [stored[f"noise.{i}"] for i in range(k)],
                                           stored["trig_times"].tolist(), stored_text["context"], trace=trace)
        for i, step in enumerate(trace):
            results[f"{name[:-12]}.step{i}.x0"] = worst_row_cosine(_latent_rows(step["x0"]),
                                                                  _latent_rows(stored[f"step{i}.x0"]))
        results[f"{name[:-12]}.final"] = worst_row_cosine(_latent_rows(final), _latent_rows(stored["final"]))
    weights = load_finite(folder / "weights.safetensors")
    for name, fmt in index.get("weight_formats", {}).items():
        deq = mlx_affine.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"], weights[f"{name}.biases"],
                                    fmt["group_size"], fmt["bits"], torch.float32)
        results[f"weights.{name}"] = worst_row_cosine(deq, weights[f"{name}.dequantized"])
    return results
