"""The distillation loop: rCM (sCM + DMD), the sCM-only ablation, the LCM baseline and DMD alone (07's LoRA transfer)
share it.

One iteration is a student step or, for rCM, a critic (fake-score) step: iteration i is a student step iff
i % student_every == 0 (rCM's F = 5 gives 4 critic updates per student update); the other methods always step
the student. Checkpoints (student, EMA, fake score, LCM target, both optimizers, RNG, data position, logs) are
written atomically to <dir>/last every `checkpoint_every` iterations, plus the EMA alone as ema_<iteration>.safetensors
so the gate can score any mid-run student. A run resumes from <dir>/last exactly, and only with the settings it was
written with (a changed lr, batch, seed, ... is refused, naming the parameter); a non-finite loss stops training
and names the term, leaving the last good checkpoint in place. `iterations` decides what is trained: the time budget
only pauses one invocation after a checkpoint (`paused`), and the next invocation resumes.
Under torchrun every rank takes rows rank::W of each global batch; every random draw is made for the global batch
(same generator on all ranks) and sliced the same way, and the losses are sums, so gradients are summed over ranks:
W ranks compute the same update as one process with the whole batch (up to float summation order). `parallel`
says how: ddp (every rank holds whole networks; one flat all-reduce) or fsdp (parallel.py: student, fake score and
LCM target sharded per transformer block, reduce-scatter; the frozen teacher stays whole on every rank). Checkpoints
hold whole tensors either way, so a run resumes with any number of processes.
With `adapters_only` the networks arrive with only some parameters requiring grad (peft LoRAs on frozen weights: the
LoRA transfer's student L' and fake-score LoRA); only those are optimized, averaged and checkpointed. The fake score
may be given (teacher+LoRA with its own trainable LoRA) instead of a copy of the student.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..flow_training import (EMA, ResumeError, load_optimizer_state, optimizer_state_tensors, check_same_run,
                             warmup_lr)
from ..io import atomic_replace_dir, atomic_write_json, load_finite, recover_dir
from . import lcm, parallel, rcm

METHODS = ("rcm", "scm", "lcm", "dmd")
PARALLEL = ("ddp", "fsdp")
# change when training stops or how it is spread over devices, not what it learns
RESUMABLE_CHANGES = ("iterations", "time_budget_s", "checkpoint_every", "parallel", "activation_checkpointing",
                     "grad_accumulation", "snapshot_every", "keep_snapshots")  # when it stops, how it fits, what
                                                                                # it keeps: not what is learned
PARAM_NAMES = {  # DistillConfig field -> the parameter a user sets (for refusal messages)
    "batch_size": "distill.batch_size", "lr": "distill.lr", "fake_lr": "distill.fake_lr",
    "student_every": "distill.student_every", "ema_decay": "distill.ema_decay", "seed": "run.seed",
    "rcm.guidance_scale": "sampler.guidance_scale", "rcm.p_g_mean": "distill.p_g[0]", "rcm.p_g_std": "distill.p_g[1]",
    "rcm.p_d_mean": "distill.p_d[0]", "rcm.p_d_std": "distill.p_d[1]", "rcm.tangent_warmup": "distill.tangent_warmup",
    "rcm.scm_weight": "distill.scm_weight", "rcm.dmd_weight": "distill.dmd_weight",
    "rcm.max_rollout": "distill.max_rollout", "rcm.sigma_max": "sampler.sigma_max", "lcm.shift": "sampler.shift",
    "rcm.tangent": "distill.tangent", "rcm.fd_delta": "distill.fd_delta", "parallel": "distill.parallel",
    "activation_checkpointing": "distill.activation_checkpointing", "grad_accumulation": "distill.grad_accumulation",
    "rcm.rollout_mid_times": "distill.rollout_times / distill.rollout_mid_times / sampler.student_mid_times"}


JVP_WITH_FSDP = ("distill.parallel = fsdp cannot take the jvp tangent (forward-mode AD does not pass through "
                 "FSDP-sharded modules); set distill.tangent: fd")


class DivergenceError(RuntimeError):
    """A loss term became NaN/Inf; the message names it and the checkpoint that was kept."""


@dataclass
class DistillConfig:
    method: str = "rcm"               # rcm | scm (rCM without DMD: the ablation) | lcm (published baseline) | dmd (DMD
                                      # without sCM, + the optional regression: the LoRA transfer)
    iterations: int = 2000            # student + critic steps together, as rCM counts them
    batch_size: int = 32              # global batch (split across ranks)
    lr: float = 1e-4                  # student
    fake_lr: float = 2e-5             # critic: 5x lower, as rCM
    warmup_steps: int = 100           # linear LR warm-up (optimizer steps of each network)
    weight_decay: float = 0.01
    betas: tuple = (0.0, 0.999)
    student_every: int = 5            # F: one student step per F iterations (rCM); other methods: every iteration
    ema_decay: float = 0.99
    checkpoint_every: int = 100
    time_budget_s: Optional[float] = None   # of one invocation: pause after a checkpoint; the next one resumes
    seed: int = 0
    net_dtype: str = "float32"
    parallel: str = "ddp"             # ddp | fsdp (under torchrun with more than one process; see parallel.py)
    activation_checkpointing: bool = False   # recompute transformer blocks in backward (never inside a JVP)
    grad_accumulation: int = 1        # passes per optimizer step, each over 1/N of this rank's rows
    snapshot_every: int = 0           # iterations between ema_<iteration> snapshots (0: with every checkpoint)
    keep_snapshots: int = 0           # keep the newest N snapshots (0: all)
    adapters_only: bool = False       # train only the parameters that require grad on arrival (peft adapters)
    rcm: rcm.RCMConfig = field(default_factory=rcm.RCMConfig)
    lcm: lcm.LCMConfig = field(default_factory=lcm.LCMConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: allowed {list(METHODS)}")
        if isinstance(self.rcm, dict):
            self.rcm = rcm.RCMConfig(**self.rcm)
        if isinstance(self.lcm, dict):
            self.lcm = lcm.LCMConfig(**self.lcm)
        self.betas = tuple(self.betas)
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel {self.parallel!r}: allowed {list(PARALLEL)}")
        if self.rcm.tangent not in rcm.TANGENTS:
            raise ValueError(f"rcm.tangent {self.rcm.tangent!r}: allowed {list(rcm.TANGENTS)}")
        if self.parallel == "fsdp" and self.method == "rcm" and self.rcm.tangent == "jvp":
            raise ValueError(JVP_WITH_FSDP)
        self.rcm.rollout_mid_times = tuple(self.rcm.rollout_mid_times)
        if self.rcm.rollout_mid_times and len(self.rcm.rollout_mid_times) < self.rcm.max_rollout - 1:
            raise ValueError(f"rcm.rollout_mid_times {list(self.rcm.rollout_mid_times)}: rollouts of up to "
                             f"{self.rcm.max_rollout} steps need {self.rcm.max_rollout - 1} times")
        if self.method == "dmd" and self.rcm.dmd_weight <= 0 and self.rcm.regression_weight <= 0:
            raise ValueError("method 'dmd' needs rcm.dmd_weight > 0 or rcm.regression_weight > 0 (nothing to train)")

    @property
    def uses_critic(self) -> bool:
        return self.method in ("rcm", "dmd") and self.rcm.dmd_weight > 0

    def is_student_step(self, iteration: int) -> bool:
        return not self.uses_critic or iteration % self.student_every == 0


ModuleCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class DistillState:
    iteration: int = 0
    student_updates: int = 0   # student optimizer updates (rCM: one per student_every iterations)
    wall_s: float = 0.0
    history: list = field(default_factory=list)   # one dict per iteration: kind, loss terms, grad norm


def _rows(value, rows: slice):
    """`value` restricted to a slice of the batch's rows: tensors, lists of them, dicts of them (None and plain
    values pass through)."""
    if torch.is_tensor(value):
        return value[rows]
    if isinstance(value, list):
        return [_rows(v, rows) for v in value]
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    return value


def _velocity(call: ModuleCall, module: torch.nn.Module):
    return lambda x, s, context: call(module, x, s, context)


def _all_reduce_grads(params) -> None:
    """Sum gradients over ranks with one flat all-reduce (DDP's job without its forward hooks, which do not fit an
    rCM step: the student runs several times — sCM forward, rollout — before one backward)."""
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


class Distiller:
    """Holds the networks, optimizers and RNG of one distillation run; `train()` runs it (resuming if it can)."""

    def __init__(self, teacher_fn: rcm.VelocityFn, student: torch.nn.Module, call: ModuleCall, data,
                 cfg: DistillConfig, checkpoint_dir: Path, rank: int = 0, world_size: int = 1,
                 log: Optional[Callable[[dict], None]] = None, fake: Optional[torch.nn.Module] = None,
                 param_names: Optional[dict] = None):
        """teacher_fn: the real score (guided here with cfg.rcm.guidance_scale); fake: the fake-score network (default:
        a copy of the student, which starts as the teacher); param_names: the parameter a user sets per config field,
        for refusal messages (default: distill.*)."""
        self.cfg, self.call, self.data, self.log = cfg, call, data, log
        self.teacher_fn = teacher_fn
        self.rank, self.world_size = rank, world_size
        self.dir = Path(checkpoint_dir)
        self.param_names = PARAM_NAMES if param_names is None else param_names
        self.net_dtype = getattr(torch, cfg.net_dtype)
        self.device = next(student.parameters()).device   # where the networks live; data and draws are moved here
        self.sharded = cfg.parallel == "fsdp" and world_size > 1   # one process has nothing to shard
        if cfg.adapters_only and self.sharded:
            raise ValueError("adapters_only with parallel = fsdp is not supported (adapters train under ddp)")
        self.student = student.train() if cfg.adapters_only else student.train().requires_grad_(True)
        if not cfg.uses_critic:
            fake = None
        elif fake is None:
            fake = copy.deepcopy(student)       # fake score starts as the student (rCM: a copy of the teacher)
        self.fake = fake.train() if fake is not None else None
        for name, module in (("student", self.student), ("fake score", self.fake)):
            if module is not None and not _trained(module):
                raise ValueError(f"the {name} has no parameter that requires grad (adapters_only: add the adapter "
                                 f"before building the Distiller)")
        self.target = copy.deepcopy(student).requires_grad_(False) if cfg.method == "lcm" else None
        if cfg.grad_accumulation > 1 and cfg.batch_size % (world_size * cfg.grad_accumulation):
            raise ValueError(f"distill.batch_size = {cfg.batch_size} must split evenly into {world_size} rank(s) x "
                             f"distill.grad_accumulation = {cfg.grad_accumulation} passes (every rank runs the same "
                             f"passes)")
        self._prepare_networks()
        named = _trained(self.student)
        self.ema = EMA(named, cfg.ema_decay)
        self.opt = torch.optim.AdamW(list(named.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.fake_opt = (torch.optim.AdamW(list(_trained(self.fake).values()), lr=cfg.fake_lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay) if self.fake is not None else None)
        self.generator = torch.Generator().manual_seed(cfg.seed)   # identical on every rank: draws are global
        self.state = DistillState()
        self.fake_steps = 0
        self.paused = False   # True when the time budget ended this invocation before cfg.iterations
        if (recover_dir(self.dir / "last") / "state.json").is_file():  # a kill inside the folder swap left .last.old
            self._load()

    def _networks(self) -> list[torch.nn.Module]:
        return [m for m in (self.student, self.fake, self.target) if m is not None]

    def _prepare_networks(self) -> None:
        """Activation checkpointing, then FSDP2 sharding — before the optimizers and the EMA see the parameters."""
        for module in self._networks():
            if self.cfg.activation_checkpointing and module is not self.target:   # the LCM target never trains
                parallel.checkpoint_activations(module)
            if self.sharded:
                parallel.shard(module, self.device, self.world_size)

    # --- one iteration ------------------------------------------------------------------------------------------------

    def _guided_teacher(self, negative):
        return rcm.guided(self.teacher_fn, negative, self.cfg.rcm.guidance_scale)

    def _local(self, global_draw: torch.Tensor) -> torch.Tensor:
        return global_draw[self.rank::self.world_size].to(self.device)

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _randn_like(self, x):
        """Noise for this rank's rows, drawn for the whole global batch."""
        return self._local(torch.randn((self.cfg.batch_size, *x.shape[1:]), generator=self.generator,
                                       dtype=torch.float64))

    def _times(self, mean: float, std: float) -> torch.Tensor:
        r = self.cfg.rcm
        return self._local(rcm.sample_trig_times(self.cfg.batch_size, mean, std, self.generator, r.t_min))

    def _rollout_times(self, steps: int) -> list[torch.Tensor]:
        return [self._local(t) for t in rcm.rollout_times(steps, self.generator, self.cfg.rcm, self.cfg.batch_size)]

    def _check(self, terms: dict) -> dict:
        """Stop on a non-finite term. Under torchrun the terms are summed over ranks first, so every rank stops
        together (and the returned values are the global batch's)."""
        if self.world_size > 1:
            import torch.distributed as dist
            values = torch.tensor(list(terms.values()), dtype=torch.float64, device=self.device)  # nccl: on device
            dist.all_reduce(values)
            terms = dict(zip(terms, values.tolist()))
        for name, value in terms.items():
            if not math.isfinite(value):
                kept = self.dir / "last"
                raise DivergenceError(
                    f"{name} loss is {value} in iteration {self.state.iteration + 1}; training stopped. The last good "
                    f"checkpoint is {kept if kept.exists() else '(none written yet)'}"
                    f"{' (iteration ' + str(self._kept_iteration()) + ')' if kept.exists() else ''}.")
        return terms

    def _kept_iteration(self):
        return json.loads((self.dir / "last" / "state.json").read_text())["iteration"]

    def _micro_batches(self, rows: int) -> list[slice]:
        """This rank's rows as `grad_accumulation` equal slices: the losses are sums, so the gradients of the slices
        add up to the whole batch's (how a global batch of 512 fits: ranks x rows per pass x accumulation)."""
        size = rows // self.cfg.grad_accumulation
        return [slice(k * size, (k + 1) * size) for k in range(self.cfg.grad_accumulation)]

    def _student_draws(self, x0: torch.Tensor) -> dict:
        """Every random draw of a student step, in the generator's order (accumulation never changes the stream)."""
        cfg, r = self.cfg, self.cfg.rcm
        if cfg.method == "lcm":
            grid_index = self._local(torch.randint(cfg.lcm.grid_steps, (cfg.batch_size,), generator=self.generator))
            return {"grid_index": grid_index, "noise": self._randn_like(x0).float()}
        draws = {"t": self._times(r.p_g_mean, r.p_g_std), "noise": self._randn_like(x0)} if cfg.method != "dmd" else {}
        if cfg.uses_critic and (cfg.method == "dmd" or self.state.student_updates >= r.tangent_warmup):
            draws["rollout_steps"] = self.state.student_updates % r.max_rollout + 1    # cycles 1..4 as rCM's code does
            draws["rollout_times"] = self._rollout_times(draws["rollout_steps"])
            draws["rollout_noises"] = [self._randn_like(x0) for _ in draws["rollout_times"]]
            draws["t_d"] = self._times(r.p_d_mean, r.p_d_std)
            draws["dmd_noise"] = self._randn_like(x0)
        return draws

    def _student_losses(self, x0, context, negative, draws: dict, regression_noise=None
                        ) -> tuple[dict, dict, torch.Tensor]:
        """Loss terms, diagnostics and the weighted total of one (micro-)batch of rows."""
        cfg, r = self.cfg, self.cfg.rcm
        teacher = self._guided_teacher(negative)
        student_fn = _velocity(self.call, self.student)
        if cfg.method == "lcm":
            loss = lcm.lcm_loss(student_fn, _velocity(self.call, self.target), teacher, x0.float(), draws["noise"],
                                context, draws["grid_index"], cfg.lcm)
            return {"lcm": loss}, {}, loss
        terms, info, total = {}, {}, 0.0
        if cfg.method != "dmd":   # rcm and its sCM-only ablation
            t, noise = draws["t"], draws["noise"]
            x_t = rcm.as_column(torch.cos(t), x0) * x0 + rcm.as_column(torch.sin(t), x0) * noise
            warmup = 1.0 if r.tangent_warmup == 0 else min(1.0, self.state.student_updates / r.tangent_warmup)
            tangent = rcm.scm_tangent(student_fn, teacher, x_t, t, context, warmup, r.tangent_norm, self.net_dtype,
                                      r.tangent, r.fd_delta)
            terms["scm"] = rcm.scm_loss(student_fn, x_t, t, context, tangent["g_hat"], self.net_dtype)
            info["g_norm"] = float(tangent["g_norm"].mean())
            total = r.scm_weight * terms["scm"]
        if r.regression_weight > 0:
            if regression_noise is None:
                raise ValueError("rcm.regression_weight > 0 needs batches with 'regression_noise' (and the teacher's "
                                 "samples from it as 'x0')")
            start = torch.full((len(x0),), math.atan(r.sigma_max), dtype=torch.float64, device=x0.device)
            one_step = rcm.student_rollout(student_fn, [regression_noise], [start], context, grad_last=True,
                                           net_dtype=self.net_dtype)
            terms["regression"] = ((one_step - x0) ** 2).sum()
            total = total + r.regression_weight * terms["regression"]
        if "t_d" in draws:
            x0_hat = rcm.student_rollout(student_fn, draws["rollout_noises"], draws["rollout_times"], context,
                                         grad_last=True, net_dtype=self.net_dtype)
            terms["dmd"], dmd_info = rcm.dmd_loss(x0_hat, draws["t_d"], draws["dmd_noise"],
                                                  _velocity(self.call, self.fake), teacher, context, self.net_dtype)
            info.update(dmd_info, rollout_steps=draws["rollout_steps"])
            total = total + r.dmd_weight * terms["dmd"]
        return terms, info, total

    def _student_step(self, batch: dict) -> dict:
        cfg = self.cfg
        x0, context, negative = batch["x0"].double(), batch["context"], batch.get("negative")
        regression_noise = batch.get("regression_noise")
        draws = self._student_draws(x0)
        values, info = {}, {}
        self.opt.zero_grad(set_to_none=True)
        for rows in self._micro_batches(len(x0)):
            terms, micro_info, total = self._student_losses(x0[rows], _rows(context, rows), negative,
                                                            _rows(draws, rows), _rows(regression_noise, rows))
            for name, value in self._check({k: float(v.detach()) for k, v in terms.items()}).items():
                values[name] = values.get(name, 0.0) + value   # sums over the slices = the batch's sum
            for name, value in micro_info.items():
                info.setdefault(name, []).append(value)
            total.backward()
        info = {k: v[0] if k == "rollout_steps" else sum(v) / len(v) for k, v in info.items()}
        params = list(_trained(self.student).values())
        if self.world_size > 1 and not self.sharded:   # FSDP reduce-scattered them in backward
            _all_reduce_grads(params)
        info["grad_norm"] = parallel.grad_norm(params)
        if not math.isfinite(info["grad_norm"]):  # already global (gradients were all-reduced)
            self._check({"student gradient norm": info["grad_norm"]})
        self._set_lr(self.opt, cfg.lr, self.state.student_updates)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)   # no student grads held through the critic steps (2B: 8 GB in fp32)
        self.state.student_updates += 1
        self.ema.update(_trained(self.student), self.state.student_updates)
        if self.target is not None:
            with torch.no_grad():
                for p_target, p in zip(self.target.parameters(), self.student.parameters()):
                    p_target.lerp_(p.detach(), 1 - cfg.lcm.target_ema)
        return {"kind": "student", **values, **info}

    def _critic_step(self, batch: dict) -> dict:
        r = self.cfg.rcm
        x0, context = batch["x0"], batch["context"]
        steps = self.fake_steps % r.max_rollout + 1
        times = self._rollout_times(steps)    # every draw first, in the generator's order
        noises = [self._randn_like(x0) for _ in times]
        t, noise = self._times(r.p_d_mean, r.p_d_std), self._randn_like(x0)
        critic_value = 0.0
        self.fake_opt.zero_grad(set_to_none=True)
        for rows in self._micro_batches(len(x0)):
            with torch.no_grad():
                x0_hat = rcm.student_rollout(_velocity(self.call, self.student), _rows(noises, rows),
                                             _rows(times, rows), _rows(context, rows), grad_last=False,
                                             net_dtype=self.net_dtype)
            loss = rcm.critic_loss(_velocity(self.call, self.fake), x0_hat, t[rows], noise[rows],
                                   _rows(context, rows), self.net_dtype)
            critic_value += self._check({"critic": float(loss.detach())})["critic"]
            loss.backward()
        params = list(_trained(self.fake).values())
        if self.world_size > 1 and not self.sharded:
            _all_reduce_grads(params)
        grad_norm = parallel.grad_norm(params)
        self._set_lr(self.fake_opt, self.cfg.fake_lr, self.fake_steps)
        self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)
        self.fake_steps += 1
        return {"kind": "critic", "critic": critic_value, "critic_grad_norm": grad_norm, "rollout_steps": steps}

    def _set_lr(self, optimizer, lr: float, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(lr, self.cfg.warmup_steps, step)

    # --- the loop ---------------------------------------------------------------------------------------------------

    def train(self, progress: bool = True, stop_after: Optional[int] = None) -> DistillState:
        """Run until cfg.iterations. The time budget of this invocation pauses it after a checkpoint (`self.paused`);
        `stop_after` more iterations returns without a checkpoint (tests use it to 'kill')."""
        cfg, state = self.cfg, self.state
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.iterations, initial=state.iteration, desc=f"distill {cfg.method}", mininterval=5)
        started = time.perf_counter() - state.wall_s   # wall_s counts every invocation; the budget only this one
        invocation_started = time.perf_counter()
        done_here = 0
        while state.iteration < cfg.iterations:
            if cfg.time_budget_s is not None and self._over_budget(invocation_started):
                break
            if stop_after is not None and done_here >= stop_after:
                return state
            batch = self._on_device(self.data.batch(state.iteration, cfg.batch_size, self.rank, self.world_size))
            if cfg.is_student_step(state.iteration):
                record = self._student_step(batch)
            else:
                record = self._critic_step(batch)
            state.iteration += 1
            done_here += 1
            state.wall_s = time.perf_counter() - started
            record.update(iteration=state.iteration, wall_s=round(state.wall_s, 3))
            state.history.append(record)
            if self.log is not None and self.rank == 0:
                self.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                 if k in ("scm", "dmd", "lcm", "regression", "critic")},
                                refresh=False)
            if state.iteration % cfg.checkpoint_every == 0:
                self.save()
        if state.iteration % cfg.checkpoint_every != 0:
            self.save()
        self.paused = state.iteration < cfg.iterations
        if bar is not None:
            bar.close()
        return state

    def _over_budget(self, invocation_started: float) -> bool:
        """Whether this invocation's time is up; under torchrun rank 0's clock decides for all (ranks stop together)."""
        over = time.perf_counter() - invocation_started > self.cfg.time_budget_s
        if self.world_size > 1:
            import torch.distributed as dist
            flag = torch.tensor([float(over)], device=self.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        return over

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Atomic: stage every file, then swap the folder in. Files hold whole tensors (gathered from the shards under
        FSDP, collectively) and only rank 0 writes, so a run may resume with another number of processes."""
        if self.rank != 0 and not self.sharded:   # DDP: every rank holds the same whole tensors; rank 0 has them
            return self.dir / "last"
        staging = self.dir / ".last.tmp"
        if self.rank == 0:
            staging.mkdir(parents=True, exist_ok=True)
        self._write(self._saved_state(self.student), staging / "student.safetensors")
        ema = self._write(self.ema.shadow, staging / "ema.safetensors")
        self._write(optimizer_state_tensors(self.opt, list(_trained(self.student))), staging / "optimizer.safetensors")
        if self.fake is not None:
            self._write(self._saved_state(self.fake), staging / "fake_score.safetensors")
            self._write(optimizer_state_tensors(self.fake_opt, list(_trained(self.fake))),
                        staging / "fake_optimizer.safetensors")
        if self.target is not None:
            self._write(self.target.state_dict(), staging / "lcm_target.safetensors")
        if self.rank != 0:
            return self.dir / "last"
        save_file({"generator": self.generator.get_state()}, staging / "rng.safetensors")
        atomic_write_json(staging / "state.json", {
            **asdict(self.state), "fake_steps": self.fake_steps, "world_size": self.world_size,
            "config": asdict(self.cfg)})
        atomic_replace_dir(staging, self.dir / "last")
        every = self.cfg.snapshot_every or self.cfg.checkpoint_every
        if self.state.iteration % every == 0 or self.state.iteration >= self.cfg.iterations:
            snapshot = self.dir / f"ema_{self.state.iteration:06d}.safetensors"
            save_file(ema, snapshot.with_suffix(".tmp"))
            snapshot.with_suffix(".tmp").rename(snapshot)
        if self.cfg.keep_snapshots:   # at 2B a snapshot is 7.8 GB: keep the newest few
            for old in sorted(self.dir.glob("ema_*.safetensors"))[:-self.cfg.keep_snapshots]:
                old.unlink()
        return self.dir / "last"

    def _saved_state(self, module: torch.nn.Module) -> dict:
        """What a checkpoint holds of a network: everything, or (adapters_only) just the trained adapter tensors."""
        if self.cfg.adapters_only:
            return {name: p.detach() for name, p in _trained(module).items()}
        return module.state_dict()

    def _write(self, tensors: dict, path: Path) -> dict:
        """Whole tensors (a collective gather under FSDP, so every rank calls this); rank 0 writes and returns them."""
        whole = parallel.full_tensors(tensors, keep=self.rank == 0)
        if self.rank == 0:
            save_file(whole, path)
        return whole

    def _load(self) -> None:
        last = self.dir / "last"
        meta = json.loads((last / "state.json").read_text())
        if meta["config"]["method"] != self.cfg.method:
            raise ValueError(f"{last}: a {meta['config']['method']} run; this one is {self.cfg.method} "
                             f"(use another checkpoint folder)")
        check_same_run(meta["config"], asdict(self.cfg), last, RESUMABLE_CHANGES, self.param_names)
        if meta["iteration"] > self.cfg.iterations:
            raise ResumeError(f"{last}: the checkpoint has trained {meta['iteration']} iterations, more than the "
                             f"{self.cfg.iterations} asked for (distill.student_updates); ask for at least as many, score "
                             f"an earlier ema_<iteration>.safetensors (distill.checkpoint), or use another run.name")
        _load_module(self.student, last / "student.safetensors", self.cfg.adapters_only)
        self.ema.shadow = _placed_like(load_finite(last / "ema.safetensors"), self.ema.shadow)
        _load_optimizer(self.opt, self.student, last / "optimizer.safetensors")
        if self.fake is not None:
            _load_module(self.fake, last / "fake_score.safetensors", self.cfg.adapters_only)
            _load_optimizer(self.fake_opt, self.fake, last / "fake_optimizer.safetensors")
        if self.target is not None:
            _load_module(self.target, last / "lcm_target.safetensors")
        self.generator.set_state(load_file(last / "rng.safetensors")["generator"])
        self.fake_steps = meta["fake_steps"]
        updates = meta["student_updates"] if "student_updates" in meta else meta["student_steps"]  # older checkpoints
        self.state = DistillState(iteration=meta["iteration"], student_updates=updates,
                                  wall_s=meta["wall_s"], history=meta["history"])


def _trained(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the trainer optimizes: those requiring grad (all of them unless adapters_only)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _placed_like(whole: dict, current: dict) -> dict:
    """Whole tensors from a checkpoint, each where its current counterpart lives (this rank's shard under FSDP)."""
    return {k: parallel.placed_like(v, current[k]) if k in current else v for k, v in whole.items()}


def _load_module(module: torch.nn.Module, path: Path, trained_only: bool = False) -> None:
    """Load a network's checkpoint; `trained_only`: it holds just the trained tensors (adapters), every one required."""
    if not trained_only:
        module.load_state_dict(_placed_like(load_finite(path), module.state_dict()))
        return
    saved, trained = load_finite(path), _trained(module)
    if set(saved) != set(trained):
        raise ResumeError(f"{path}: holds other adapter tensors than this run trains (e.g. "
                          f"{sorted(set(saved) ^ set(trained))[:3]}); use another checkpoint folder")
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(saved[name].to(p.dtype))


def _load_optimizer(optimizer: torch.optim.Optimizer, module: torch.nn.Module, path: Path) -> None:
    """Adam moments (saved whole, named <param>::<key>) cut like their parameter; scalar entries (step) as saved."""
    params = _trained(module)
    tensors = {}
    for key, value in load_finite(path).items():
        param = params.get(key.split("::", 1)[0])
        same_shape = param is not None and tuple(value.shape) == tuple(param.shape)
        tensors[key] = parallel.placed_like(value, param) if same_shape else value
    load_optimizer_state(optimizer, list(params), tensors)


def load_student_weights(module: torch.nn.Module, checkpoint: Path, which: str = "ema") -> torch.nn.Module:
    """Load a student into `module` (a copy of the teacher's transformer): `checkpoint` is a run's checkpoint folder
    (its last EMA / raw student), or one ema_<iteration>.safetensors file."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        path = checkpoint
    else:
        path = recover_dir(checkpoint / "last") / ("ema.safetensors" if which == "ema" else "student.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no student checkpoint; run notebook 02_distill first")
    weights = load_finite(path)
    missing = set(dict(module.named_parameters())) - set(weights)
    if missing:
        raise ValueError(f"{path}: does not fit this transformer (missing {sorted(missing)[:3]}...)")
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(weights[name].to(p.dtype))
    return module.eval().requires_grad_(False)
