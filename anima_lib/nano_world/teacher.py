"""The nano teacher: the nano Anima components trained by flow matching on renderer images, shipped in the repo.

Run in the background (resumable; a crash loses at most `checkpoint_every` steps):
    python -m anima_lib.nano_world.teacher --set teacher.minutes=60 [--ship]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import networks
from ..config import load_config
from ..flow_training import FlowMatchingConfig, load_ema_into, smoothed, train_flow_matching
from ..checks import Check
from ..models import SHIPPED_TEACHER, load_teacher, save_teacher, verify_teacher  # noqa: F401 - the teacher's files
from .prompts import all_creatures, vocabulary
from .renderer import render_batch


def render_pool(jitter_seeds: int, size: int = 32, style: bool = False) -> tuple[torch.Tensor, list[int], list[str]]:
    """Every attribute combination x `jitter_seeds` renders: uint8 images [N,3,H,W], prompt index per image, prompts."""
    creatures = all_creatures()
    images, prompt_index = [], []
    for seed in range(jitter_seeds):
        batch = render_batch(creatures, [seed] * len(creatures), size, style)
        images.append((batch * 255).round().to(torch.uint8))
        prompt_index.extend(range(len(creatures)))
    return torch.cat(images), prompt_index, [c.prompt() for c in creatures]


class PromptEncoder:
    """Frozen Qwen3 states precomputed once; the trainable conditioner runs per batch (with grad)."""

    def __init__(self, components: networks.AnimaComponents, prompts: list[str]):
        tok = components.tokenizer(prompts, padding="longest", return_tensors="pt")
        t5 = components.t5_tokenizer(prompts, padding="longest", return_tensors="pt")
        with torch.no_grad():
            hidden = components.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        self.hidden = hidden * tok.attention_mask[..., None]
        self.mask, self.t5_ids, self.t5_mask = tok.attention_mask, t5.input_ids, t5.attention_mask
        self.conditioner = components.text_conditioner

    def __call__(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.conditioner(source_hidden_states=self.hidden[prompt_ids], target_input_ids=self.t5_ids[prompt_ids],
                                target_attention_mask=self.t5_mask[prompt_ids], source_attention_mask=self.mask[prompt_ids])


def train_nano_teacher(out_dir: Path, cfg: FlowMatchingConfig, jitter_seeds: int = 16, image_size: int = 32,
                       progress: bool = True, init: str = "scratch") -> tuple[networks.AnimaComponents, dict]:
    """Train from random init ('scratch') or fine-tune the shipped teacher ('shipped', same frozen text encoder)."""
    out_dir = Path(out_dir)
    if init == "shipped":
        components = load_teacher(SHIPPED_TEACHER)
    else:
        components = networks.build_nano(vocabulary(), seed=cfg.seed)
        torch.nn.init.zeros_(components.transformer.proj_out.weight)  # start as the zero velocity: stable early steps
    components.text_encoder.requires_grad_(False)  # frozen, random init, shipped for reproducibility
    components.transformer.requires_grad_(True)
    components.text_conditioner.requires_grad_(True)
    t0 = time.perf_counter()
    pool, prompt_index, prompts = render_pool(jitter_seeds, image_size)
    render_s = time.perf_counter() - t0
    prompt_index = torch.tensor(prompt_index)
    encode = PromptEncoder(components, prompts)
    empty_context = components.encode_prompts([""])

    def batches(step, generator):
        pick = torch.randint(len(pool), (cfg.batch_size,), generator=generator)
        x0 = components.codec.encode(pool[pick].float() / 255)
        return x0, encode(prompt_index[pick])

    modules = {"transformer": components.transformer, "text_conditioner": components.text_conditioner}
    log_path = out_dir / "log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    result = train_flow_matching(modules, components.velocity, batches, empty_context, cfg, out_dir / "checkpoints",
                                 log=log, progress=progress)
    load_ema_into(modules, out_dir / "checkpoints")
    components.eval()
    result.update(render_s=render_s, pool_images=len(pool), jitter_seeds=jitter_seeds, init=init)
    return components, result


def training_manifest(cfg: FlowMatchingConfig, result: dict) -> dict:
    """What the shipped teacher records about its training: parameters, steps, wall time, loss curve, machine."""
    losses = result["losses"]
    curve = smoothed(losses)
    every = max(1, len(curve) // 400)
    return {"what": "nano teacher (EMA weights)", "config": asdict(cfg), "steps": result["step"],
            "wall_s": round(result["wall_s"], 1), "final_loss_50": curve[-1] if curve else None,
            "pool_images": result.get("pool_images"), "jitter_seeds": result.get("jitter_seeds"),
            "init": result.get("init", "scratch"), "previous": result.get("previous"),
            "machine": f"{platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}",
            "loss_curve": {"step": list(range(1, len(curve) + 1, every)), "loss": [round(v, 5) for v in curve[::every]]}}


def training_chain(manifest: dict) -> list[dict]:
    """The teacher's training runs, oldest first (a fine-tune records the run it started from under "previous")."""
    chain, run = [], manifest
    while run:
        chain.append(run)
        run = run.get("previous")
    return chain[::-1]


def teacher_config(params) -> FlowMatchingConfig:
    """The flow-matching settings of the nano teacher, from the `teacher` section of the parameters."""
    t = params.teacher
    return FlowMatchingConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr, caption_dropout=t.caption_dropout,
                              logit_mean=t.logit_mean, logit_std=t.logit_std, time_budget_s=t.minutes * 60,
                              seed=params.run.seed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="e.g. teacher.minutes=60")
    parser.add_argument("--out", type=Path, default=Path("outputs/nano_teacher_train"))
    parser.add_argument("--ship", action="store_true", help=f"write the EMA teacher to {SHIPPED_TEACHER}")
    args = parser.parse_args(argv)
    params = load_config(args.preset, args.overrides)
    if params.run.threads:
        torch.set_num_threads(params.run.threads)
    cfg = teacher_config(params)
    previous = verify_teacher(SHIPPED_TEACHER) if params.teacher.init == "shipped" else None
    components, result = train_nano_teacher(args.out, cfg, jitter_seeds=params.teacher.jitter_seeds,
                                            init=params.teacher.init)
    if result["paused"]:  # the time budget pauses; only the step count decides what gets saved
        print(f"paused at step {result['step']} of {cfg.steps} after teacher.minutes={params.teacher.minutes}; "
              f"run the same command again to resume from {args.out / 'checkpoints'}", file=sys.stderr)
        return 3
    if previous is not None:  # a fine-tune records what it started from
        result["previous"] = {k: previous.get(k) for k in ("steps", "wall_s", "final_loss_50", "config", "previous")}
    manifest = training_manifest(cfg, result)
    target = SHIPPED_TEACHER if args.ship else args.out / "teacher"
    save_teacher(components, target, manifest)
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=2))
    print(f"saved {target}")
    return 0


# --- 00_nano_teacher's checks -----------------------------------------------------------------------------------------

def judge(manifest: dict) -> list[Check]:
    """00's check, on the manifest `verify_teacher` returned (it raises on a missing or altered file, so reaching this
    means every file the manifest lists matched its sha256): the manifest vouches for at least one weight file."""
    files = manifest.get("files") or {}
    return [Check(f"every weight file matches the manifest's sha256 ({len(files)} files)", bool(files))]


if __name__ == "__main__":
    sys.exit(main())
