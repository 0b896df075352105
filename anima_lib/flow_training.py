"""Flow-matching training as Anima was trained: RF velocity target, logit-normal times, caption dropout, AdamW, EMA,
atomic resumable checkpoints. Used for the nano teacher and the style/De-Turbo adapters (lora.py); the distillation
trainer shares its EMA, checkpoint and resume checks. The flow and TrigFlow conventions themselves are flow.py's.

    x_s = (1-s) x0 + s eps,   target v = eps - x0,   loss = mean ||net(x_s, s, c) - v||^2
    s = sigmoid(N(mean, std))  (logit-normal, optionally shifted like the sampler)
    with probability caption_dropout the context is the empty prompt's (so CFG works at sampling)
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from . import flow
from .io import atomic_replace_dir, atomic_write_json, load_finite, recover_dir


class ResumeError(ValueError):
    """A checkpoint cannot be resumed as asked (other settings, or trained past the asked-for steps); says what to do."""


@dataclass
class FlowMatchingConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: float = 1.0           # 1 = plain logit-normal; >1 moves training time toward high noise
    uniform_fraction: float = 0.0     # this fraction of times drawn uniformly in (0, 1) instead (coverage of the ends)
    checkpoint_every: int = 200
    time_budget_s: Optional[float] = None  # of one invocation: pause (after a checkpoint) when exceeded; rerun resumes
    seed: int = 0


def sample_times(n: int, cfg: FlowMatchingConfig, generator: torch.Generator) -> torch.Tensor:
    s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    s = flow.shift_sigmas(s, cfg.time_shift) if cfg.time_shift != 1.0 else s
    if cfg.uniform_fraction > 0:  # drawn only when asked, so earlier runs' random streams are unchanged
        uniform = torch.rand(n, generator=generator) < cfg.uniform_fraction
        s = torch.where(uniform, torch.rand(n, generator=generator).clamp(1e-3, 1 - 1e-3), s)
    return s


def flow_matching_loss(velocity_fn: Callable, x0: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
                       noise: torch.Tensor, target_fn: Optional[Callable] = None) -> torch.Tensor:
    """Mean squared velocity error; the target is eps - x0, or target_fn(x_s, sigma, context) (e.g. a teacher's
    velocity, for De-Turbo) when given."""
    x_s = flow.rf_noisy(x0, noise, sigma)
    prediction = velocity_fn(x_s, sigma, context)
    if target_fn is None:
        target = flow.rf_velocity(x0, noise)
    else:
        with torch.no_grad():
            target = target_fn(x_s, sigma, context)
    return ((prediction.float() - target.float()) ** 2).mean()


class EMA:
    """Exponential moving average of trainable parameters (kept in fp32)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages don't drag in the init
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - decay)


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """Linear warm-up over `warmup_steps` optimizer steps, then constant (both trainers use it)."""
    return lr * min(1.0, (step + 1) / max(1, warmup_steps))


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors keyed "<parameter name>::<state key>" (a safetensors file)."""
    out = {}
    for index, name in enumerate(names):
        for key, value in optimizer.state_dict()["state"].get(index, {}).items():
            out[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict) -> None:
    """Put back what optimizer_state_tensors wrote, matched by parameter name."""
    state = optimizer.state_dict()
    state["state"] = {}
    for index, name in enumerate(names):
        entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
        if entries:
            state["state"][index] = entries
    optimizer.load_state_dict(state)


def train_flow_matching(modules: dict[str, torch.nn.Module], velocity_fn: Callable,
                        batches: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                        empty_context: torch.Tensor, cfg: FlowMatchingConfig, checkpoint_dir: Path,
                        log: Optional[Callable[[dict], None]] = None, progress: bool = True,
                        target_fn: Optional[Callable] = None, desc: str = "flow matching") -> dict:
    """Train the parameters of `modules` that require grad; resumes from checkpoint_dir/last when present.

    batches(step, generator) -> (x0 latents [B,...], context [B,L,D]); velocity_fn(x, sigma, context) -> v;
    target_fn: see flow_matching_loss. A checkpoint written with other training settings is refused, not mixed in.
    `cfg.steps` decides what is trained; `cfg.time_budget_s` only pauses this invocation after a checkpoint
    ("paused": True), and calling again resumes exactly. Returns {"step", "wall_s", "losses", "paused"}; EMA weights
    are in checkpoint_dir/last/ema.safetensors.
    """
    checkpoint_dir = Path(checkpoint_dir)
    named = {f"{m}.{n}": p for m, module in modules.items() for n, p in module.named_parameters() if p.requires_grad}
    names = list(named)
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(named, cfg.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, wall_s, losses = 0, 0.0, []
    last = recover_dir(checkpoint_dir / "last")  # a kill inside the folder swap leaves the old copy: use it
    if (last / "state.json").is_file():  # resume exactly: weights, EMA, optimizer, RNG, step
        meta = json.loads((last / "state.json").read_text())
        check_same_run(meta.get("config", {}), asdict(cfg), last)
        if meta["step"] > cfg.steps:
            raise ResumeError(f"{last}: the checkpoint has trained {meta['step']} steps, more than the {cfg.steps} "
                             f"asked for; ask for at least {meta['step']} steps or delete the folder to start over")
        weights = load_finite(last / "weights.safetensors")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(weights[k])
        ema.shadow = {k: v.float() for k, v in load_finite(last / "ema.safetensors").items()}
        load_optimizer_state(optimizer, names, load_finite(last / "optimizer.safetensors"))
        generator.set_state(load_file(last / "rng.safetensors")["generator"])
        step, wall_s, losses = meta["step"], meta["wall_s"], meta["losses"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=desc, mininterval=5)
    started = time.perf_counter() - wall_s  # wall_s counts every invocation; the budget only this one
    invocation_started = time.perf_counter()

    def save():
        staging = checkpoint_dir / ".last.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in named.items()}, staging / "weights.safetensors")
        save_file(ema.shadow, staging / "ema.safetensors")
        save_file(optimizer_state_tensors(optimizer, names), staging / "optimizer.safetensors")
        save_file({"generator": generator.get_state()}, staging / "rng.safetensors")
        atomic_write_json(staging / "state.json", {"step": step, "wall_s": time.perf_counter() - started,
                                                   "losses": losses, "config": asdict(cfg)})
        atomic_replace_dir(staging, last)  # the checkpoint appears complete or not at all

    for module in modules.values():
        module.train()
    while step < cfg.steps:
        if cfg.time_budget_s is not None and time.perf_counter() - invocation_started > cfg.time_budget_s:
            break
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(cfg.lr, cfg.warmup_steps, step)
        x0, context = batches(step, generator)
        device = x0.device   # draws come from the CPU generator (same numbers on any device), then move there
        drop = (torch.rand(len(x0), generator=generator) < cfg.caption_dropout).to(device)
        context = torch.where(drop[:, None, None], empty_context.to(device).expand_as(context), context)
        sigma = sample_times(len(x0), cfg, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        loss = flow_matching_loss(velocity_fn, x0, context, sigma, noise, target_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(named, step)
        step += 1
        losses.append(round(loss.item(), 6))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
        if log is not None and step % 50 == 0:
            log({"step": step, "loss": sum(losses[-50:]) / 50, "wall_s": time.perf_counter() - started})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    if step % cfg.checkpoint_every != 0 and step != cfg.steps:
        save()
    if bar is not None:
        bar.close()
    for module in modules.values():
        module.eval()
    return {"step": step, "wall_s": time.perf_counter() - started, "losses": losses, "paused": step < cfg.steps}


RESUMABLE_CHANGES = ("steps", "time_budget_s", "checkpoint_every")  # may differ between a run and its resumption


def _flatten(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_run(saved: dict, current: dict, folder: Path, resumable=RESUMABLE_CHANGES,
                   param_names: Optional[dict] = None) -> None:
    """Refuse to resume a checkpoint written with other settings (what is learned would silently mix); the message
    names each changed setting (as the parameter a user sets, where `param_names` maps it) and both values."""
    saved, current = _flatten(saved), _flatten(json.loads(json.dumps(current)))  # JSON: tuples compare as lists
    changed = {k: (saved[k], current[k]) for k in current if k in saved and k not in resumable
               and saved[k] != current[k]}
    if changed:
        names = param_names or {}
        detail = ", ".join(f"{names.get(k, k)}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise ResumeError(f"{folder}: a checkpoint of a run with other settings ({detail}); restore the settings to "
                         f"resume, or use another run.name (or delete the folder) to start over")


def load_ema_into(modules: dict[str, torch.nn.Module], checkpoint_dir: Path) -> None:
    """Copy the EMA weights of a training run into the modules (what gets shipped and sampled)."""
    shadow = load_finite(recover_dir(Path(checkpoint_dir) / "last") / "ema.safetensors")
    with torch.no_grad():
        for m, module in modules.items():
            for n, p in module.named_parameters():
                if f"{m}.{n}" in shadow:
                    p.copy_(shadow[f"{m}.{n}"].to(p.dtype))


def smoothed(losses: list[float], window: int = 50) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(losses):
        total += value
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out

