"""Output refinement of a quantized student (04, after the codes are chosen): every quantized layer keeps its integer
codes, and its per-group scale and bias — the checkpoint's `scales` and `biases`, bf16 — are fitted by gradient
descent so that the quantized student's few-step samples match the full-precision student's from the same noise, at
every step count the phone serves. Same file, same bytes; what moves is where each group's 2^bits levels sit.

Why it pays: awq and gptq fit each layer alone on its own inputs; their errors add up through the blocks and through
the chain's steps, which is where the eye count goes (issue 20: on 2,048 held-out images the unrefined 4-bit student
lost 0.018 of strict alignment at 2 steps, while every block role alone cost < 0.005). Training only these
parameters with the codes frozen is the end-to-end stage of EfficientQAT (Chen et al. 2024) at post-training cost:
two values per group of 32 weights, a few hundred small updates.

The caller gives the prompts (04: the cache's, never the gate's) and their noise (run.seed + `REFINE_SEED_OFFSET`);
the last `config.REFINE_VALIDATION_FRACTION` of them are never trained on and decide whether the refinement is kept.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from .. import sampler
from ..config import refine_split
from ..flow_training import load_optimizer_state, optimizer_state_tensors
from ..io import atomic_replace_dir, atomic_write_json, load_finite, recover_dir
from ..networks import velocity_fn
from . import mlx_affine
from .packed import QuantizedLinear, set_module

REFINE_SEED_OFFSET = 104_729      # noise and batch order: run.seed + this


class _TrainableAffine(torch.nn.Module):
    """A QuantizedLinear whose group scales and biases train: scale = s0·exp(log_scale), bias = b0 + s0·shift (steps
    relative to the group's own scale, so one learning rate suits every layer); the codes stay packed."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.layer = layer
        self.register_buffer("s0", layer.scales.float().clone())
        self.register_buffer("b0", layer.biases.float().clone())
        self.log_scale = torch.nn.Parameter(torch.zeros_like(self.s0))
        self.shift = torch.nn.Parameter(torch.zeros_like(self.s0))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.s0 * self.log_scale.exp(), self.b0 + self.s0 * self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        scales, biases = self.affine()
        codes = mlx_affine.unpack(layer.weight, layer.bits, layer.in_features).to(x.dtype)
        weight = codes.reshape(*scales.shape, layer.group_size) * scales[..., None] + biases[..., None]
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight.reshape(layer.out_features, layer.in_features), bias)

    @torch.no_grad()
    def commit(self, stored: torch.dtype) -> None:
        """Write the fitted scales and biases into the layer, rounded to `stored` (the checkpoint's dtype)."""
        scales, biases = self.affine()
        self.layer.scales.copy_(scales.to(stored))
        self.layer.biases.copy_(biases.to(stored))


def _swap(model: torch.nn.Module, make: Callable[[torch.nn.Module], torch.nn.Module], kind: type) -> dict:
    swapped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            swapped[name] = make(module)
            set_module(model, name, swapped[name])
    return swapped


def _digest(trainable: dict[str, _TrainableAffine], targets: dict[int, torch.Tensor]) -> str:
    """Which fit a checkpoint belongs to: the sha256 of every layer's starting scales and biases (the quantized model)
    and of the targets (the reference model, prompts and noise)."""
    h = hashlib.sha256()
    tensors = [(name, t) for name, layer in trainable.items() for t in (layer.s0, layer.b0)]
    for name, tensor in tensors + [(f"@{k}", target) for k, target in targets.items()]:
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(folder: Path, state: dict, named: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    staging = folder / ".last.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, staging / "affine.safetensors")
    save_file(optimizer_state_tensors(optimizer, list(named)), staging / "optimizer.safetensors")
    save_file({"generator": generator.get_state()}, staging / "rng.safetensors")
    atomic_write_json(staging / "state.json", state)
    atomic_replace_dir(staging, folder / "last")   # the checkpoint appears complete or not at all


def _resume(folder: Optional[Path], config: dict, named: dict[str, torch.nn.Parameter],
            optimizer: torch.optim.Optimizer, generator: torch.Generator) -> tuple[int, list]:
    """(update to start at, losses so far): from folder/last when it was written for this `config` (settings and
    digest), else from scratch (a checkpoint of another model, other prompts or other settings is stale: replaced)."""
    if folder is None:
        return 0, []
    last = recover_dir(folder / "last")
    if not (last / "state.json").is_file():
        return 0, []
    state = json.loads((last / "state.json").read_text())
    if state.get("config") != json.loads(json.dumps(config)):
        return 0, []
    values = load_finite(last / "affine.safetensors")
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(values[name])
    load_optimizer_state(optimizer, list(named), load_finite(last / "optimizer.safetensors"))
    generator.set_state(load_file(last / "rng.safetensors")["generator"])
    return state["update"], state["losses"]


def chain_errors(model: torch.nn.Module, targets: dict[int, torch.Tensor], noises: list, context: torch.Tensor,
                 params, rows=slice(None), batch_size: Optional[int] = None) -> dict[int, float]:
    """{k: mean squared error of model's k-step final latents against targets[k]} on `rows` (no gradient)."""
    with torch.no_grad():
        return {k: float((sampler.student_sample(model, [n[rows] for n in noises[:k]], context[rows], params,
                                                 batch_size=batch_size) - target[rows]).pow(2).mean())
                for k, target in targets.items()}


def refine_affine(quantized: torch.nn.Module, reference: torch.nn.Module, noises: list, context: torch.Tensor, params,
                  steps, updates: int, lr: float, batch_size: int, stored: torch.dtype = torch.bfloat16,
                  progress: bool = True, checkpoint_dir: Optional[Path] = None, checkpoint_every: int = 50) -> dict:
    """Fit `quantized`'s group scales and biases (in place, rounded to their stored dtype) so its k-step samples match
    `reference`'s from the same noise, k cycling through `steps`; `noises` (max(steps) tensors) and `context` rows are
    the prompts. The last config.REFINE_VALIDATION_FRACTION of rows are never trained on: the fit is kept only when
    their mean chain error over `steps` went down (else `quantized` is left as it was). Returns the before / after
    errors on both splits (after: with the values rounded to `stored`), the loss per update ({"iteration", "@k"}) and
    whether it was kept. Computes in `quantized`'s own dtype: give it the float model the gate scores.
    With `checkpoint_dir`, the fit (values, Adam state, batch order) is written there atomically every
    `checkpoint_every` updates and resumed exactly by a later call on the same model and settings."""
    steps = sorted(steps)
    rows = len(context)
    n_train, n_val = refine_split(rows)
    if n_train < 1 or max(steps) > len(noises):
        raise ValueError(f"refine_affine: {rows} prompts leave none to train on, or {len(noises)} noise tensors for "
                         f"{max(steps)} steps")
    train_rows, val_rows = slice(0, n_train), slice(n_train, rows)
    # no-grad chains go batch_size rows at a time too: 128 rows at once at 1024² would not fit a GPU
    targets = {k: sampler.student_sample(reference, noises[:k], context, params, batch_size=batch_size)
               for k in steps}

    def errors() -> dict[str, dict[int, float]]:
        return {split: chain_errors(quantized, targets, noises, context, params, rows_of_split, batch_size)
                for split, rows_of_split in (("train", train_rows), ("validation", val_rows))}
    before = errors()
    trainable = _swap(quantized, _TrainableAffine, QuantizedLinear)
    try:
        quantized.requires_grad_(False)
        named = {f"{name}.{kind}": getattr(t, kind) for name, t in trainable.items() for kind in ("log_scale", "shift")}
        for p in named.values():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(list(named.values()), lr=lr)
        generator = torch.Generator().manual_seed(params.run.seed + REFINE_SEED_OFFSET)
        config = {"updates": updates, "lr": lr, "batch_size": batch_size, "steps": steps, "prompts": rows,
                  "digest": _digest(trainable, targets)}
        start, losses = _resume(checkpoint_dir, config, named, optimizer, generator)
        chain = sampler.consistency_sample.__wrapped__   # the sampler itself, with gradients
        velocity = velocity_fn(quantized)
        updates_range = range(start, updates)
        if progress:
            from tqdm.auto import tqdm
            updates_range = tqdm(updates_range, initial=start, total=updates, desc="refine scales/biases",
                                 mininterval=5)
        for update in updates_range:
            for group in optimizer.param_groups:   # cosine decay to 0 over `updates`
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * update / max(updates, 1)))
            k = steps[update % len(steps)]
            batch = torch.randperm(n_train, generator=generator)[:batch_size]
            final = chain(velocity, [n[batch] for n in noises[:k]], sampler.student_times(params, k), context[batch])
            loss = (final - targets[k][batch]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append({"iteration": update, f"@{k}": float(loss.detach())})
            if checkpoint_dir is not None and ((update + 1) % checkpoint_every == 0 or update + 1 == updates):
                _save_checkpoint(checkpoint_dir, {"update": update + 1, "losses": losses, "config": config}, named,
                                 optimizer, generator)
        fitted = {t.layer: t for t in trainable.values()}
    finally:
        _swap(quantized, lambda t: t.layer, _TrainableAffine)
    originals = {layer: (layer.scales.clone(), layer.biases.clone()) for layer in fitted}
    for t in fitted.values():
        t.commit(stored)
    after = errors()
    kept = _mean(after["validation"]) < _mean(before["validation"])
    if not kept:
        with torch.no_grad():
            for layer, (scales, biases) in originals.items():
                layer.scales.copy_(scales)
                layer.biases.copy_(biases)
    return {"before": before, "after": after, "kept": kept, "updates": updates, "loss": losses,
            "train_prompts": n_train, "validation_prompts": n_val}


def _mean(errors: dict[int, float]) -> float:
    return sum(errors.values()) / len(errors)
