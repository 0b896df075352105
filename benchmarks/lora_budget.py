"""How many steps a style LoRA needs to carry the style: score a LoRA training folder's current EMA checkpoint.

Issue 17 asks the reference teacher+L@20 to read style >= 0.8 with content >= 0.95x the bare teacher's before any
survival ratio; issue 20 asks `make run` to be short. The LoRA trainer's lr is constant after warm-up, so the EMA
checkpoint at step N is what an N-step budget would ship: scoring checkpoints as training goes draws the curve that
decides `lora.steps`. Each call appends one line to outputs/bench/lora_budget.jsonl.

    python benchmarks/lora_budget.py params/nano.yaml \
        outputs/s3-sampler/lora/style-8a799b1480/teacher-train [--n-prompts 32 --seeds 2] [--set ...]
    (or a copied checkpoint folder, e.g. outputs/<run>/lora-snapshots/teacher/step-1000, in place of the train folder)
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from anima_lib import config, lora, lora_survival, models, worlds
from anima_lib.flow_training import load_ema_into


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint folder (with state.json): `path` itself, or a LoRA training folder's checkpoints/last."""
    return path if (path / "state.json").is_file() else path / "checkpoints" / "last"


def checkpoint_lora(teacher: torch.nn.Module, checkpoint: Path, rank: int, alpha: float) -> tuple[lora.LoraWeights, int]:
    """The EMA LoRA of a checkpoint (copied first: the trainer may replace it meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "checkpoints"
        shutil.copytree(checkpoint, snapshot / "last")
        step = json.loads((snapshot / "last" / "state.json").read_text())["step"]
        trainee = lora.fused(teacher, []).float()
        lora.add_adapter(trainee, rank, alpha)
        load_ema_into({"transformer": trainee}, snapshot)
        return lora.from_adapter(trainee, rank, alpha), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("train_folder", type=Path, help="a LoRA's <way>-train folder, or a copy of one checkpoint")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    if not (checkpoint_dir(args.train_folder) / "state.json").is_file():
        parser.error(f"train_folder {args.train_folder}: no state.json in it or in its checkpoints/last")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    params = config.load_config(args.preset, args.overrides)
    world = worlds.load_world(params).with_gate(args.n_prompts, args.seeds)
    components = models.load_components(params)
    style, step = checkpoint_lora(components.transformer, checkpoint_dir(args.train_folder), params.lora.rank, params.lora.alpha)
    T = params.sampler.teacher_steps
    reference = lora.fused(components.transformer, [(style, 1.0)])
    rows, _ = lora_survival.styled_rows(params, components, world, reference, None, {}, steps=())
    names = lora_survival.SURVIVAL_METRICS[world.kind]
    checks = lora_survival.reference_checks(rows, f"teacher+lora@{T}", f"teacher@{T}", names, world.kind)
    ref, bare = rows[f"teacher+lora@{T}"], rows[f"teacher@{T}"]
    record = {"folder": str(args.train_folder), "step": step, "images": len(world.gate.image_prompt),
              "style": ref[names["style"]], "bare_style": bare[names["style"]],
              "content_ratio": ref[names["content"]] / max(bare[names["content"]], 1e-9),
              "checks": {c.name: c.passed for c in checks}, "eval_s": time.perf_counter() - started}
    print(json.dumps(record, indent=1))
    out = config.resolve_path(params.run.output_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lora_budget.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
