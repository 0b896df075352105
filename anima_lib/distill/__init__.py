"""Step distillation of the Anima DiT: rCM (`rcm`), the LCM baseline (`lcm`) and the loop both use (`trainer`).

`run_distill(params, method)` is what 02_distill, the CLI (`anima distill`) and torchrun call: it checks the cache
against this run's teacher, builds the student from the teacher, and trains (resuming when a checkpoint exists).
Under torchrun `start_process` first pins each rank to its device and starts the process group (nccl on CUDA, gloo
on CPU); `distill.parallel` then picks DDP-style replicas or FSDP2 shards (parallel.py).
Artifacts: outputs/<run>/checkpoints/<method>/{last/, ema_<iteration>.safetensors, log.jsonl}.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models
from ..cache import CacheBatches, cache_folder, env_rank
from ..checks import Check
from .rcm import RCMConfig
from .trainer import DistillConfig, Distiller, DivergenceError, load_student_weights  # noqa: F401

METHOD_ROWS = {"rcm": "student", "scm": "student_scm", "lcm": "student_lcm"}   # gate rows: <name>@<steps>


def checkpoint_dir(params, method: str) -> Path:
    return params.output_path() / "checkpoints" / method


def distill_config(params, method: str) -> DistillConfig:
    d = params.distill
    # rollouts at the times the student is served at, unless distill.rollout_mid_times names others
    mid_times = params.sampler.student_mid_times if d.rollout_mid_times is None else d.rollout_mid_times
    rollout_mid_times = tuple(mid_times[: d.max_rollout - 1])
    rcm_cfg = RCMConfig(guidance_scale=params.sampler.guidance_scale, p_g_mean=d.p_g[0], p_g_std=d.p_g[1],
                        p_d_mean=d.p_d[0], p_d_std=d.p_d[1], tangent_warmup=d.tangent_warmup,
                        scm_weight=d.scm_weight, dmd_weight=0.0 if method == "scm" else d.dmd_weight,
                        max_rollout=d.max_rollout, sigma_max=params.sampler.sigma_max, tangent=d.tangent,
                        fd_delta=d.fd_delta, rollout_mid_times=rollout_mid_times if d.rollout_times == "sampler" else ())
    cfg = DistillConfig(method="rcm" if method == "scm" else method, batch_size=d.batch_size, lr=d.lr,
                        fake_lr=d.fake_lr, student_every=d.student_every, ema_decay=d.ema_decay,
                        checkpoint_every=d.checkpoint_every, time_budget_s=d.minutes * 60, seed=params.run.seed,
                        parallel=d.parallel, activation_checkpointing=d.activation_checkpointing,
                        grad_accumulation=d.grad_accumulation, snapshot_every=d.snapshot_every,
                        keep_snapshots=d.keep_snapshots, rcm=rcm_cfg)
    cfg.lcm.shift = params.sampler.shift
    cfg.iterations = d.student_updates * (d.student_every if cfg.uses_critic else 1)
    return cfg


def build_distiller(params, method: str, components=None, rank: int = 0, world_size: int = 1,
                    log_to_file: bool = True) -> Distiller:
    """Everything a run needs, checked before any training: the cache (built by this teacher), the student (a float32
    copy of the teacher's DiT, or the checkpoint it resumes from)."""
    if method not in METHOD_ROWS:
        raise ValueError(f"method {method!r}: allowed {list(METHOD_ROWS)}")
    components = components if components is not None else models.load_components(params)
    teacher = components.transformer.eval().requires_grad_(False)
    data = CacheBatches(cache_folder(params), precision=params.cache.precision, seed=params.run.seed,
                        teacher_sha256=models.weights_digest(teacher))
    student = copy.deepcopy(teacher).float()
    folder = checkpoint_dir(params, method)
    log_path = folder / "log.jsonl"

    def log(record):
        if log_to_file:
            folder.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return Distiller(models.velocity_fn(teacher), student, models.transformer_velocity, data,
                     distill_config(params, method), folder, rank=rank, world_size=world_size, log=log)


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    local_rank: int          # this process's GPU on its node
    device: torch.device


def start_process(device: str) -> Process:
    """This process's place under torchrun (rank 0 of 1 otherwise), its device selected and, with several processes,
    the process group started: nccl on CUDA, gloo on CPU. CUDA ranks select cuda:LOCAL_RANK before anything is
    allocated or the group starts, so they don't all land on cuda:0 (models then load to 'cuda' = that device)."""
    rank, world_size = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return Process(rank, world_size, local_rank, where)


def run_distill(params, method: str = "rcm", progress: bool = True, components=None) -> Distiller:
    """Train (or resume, or find finished) one method; under torchrun every rank calls this."""
    process = start_process(params.run.device)
    distiller = build_distiller(params, method, components, process.rank, process.world_size)
    distiller.train(progress=progress)
    return distiller


def load_student(params, components, method: str = "rcm", checkpoint: str = "last") -> torch.nn.Module:
    """The EMA student of `method` as a transformer next to the teacher's (for the gate and the later notebooks)."""
    source = checkpoint_dir(params, method) if checkpoint == "last" else Path(checkpoint)
    return load_student_weights(copy.deepcopy(components.transformer).float(), source)


# --- 02_distill's checks ----------------------------------------------------------------------------------------------

# the row 02 judges, and what it must beat: the teacher's own Euler at the same single step (what distilling is for)
JUDGED_ROW, BASELINE_ROW, BASELINE_LABEL = "student@1", "teacher@1", "teacher Euler@1"


def judge(rows: dict[str, dict], world) -> list[Check]:
    """02's checks: JUDGED_ROW beats BASELINE_ROW strictly on both of the world's step metrics (`world.beats`: nano
    lower fd_probe and higher alignment; real lower fid_vs_teacher and higher clip_score)."""
    return [Check(name, passed) for name, passed in world.beats(rows, JUDGED_ROW, BASELINE_ROW, BASELINE_LABEL).items()]
