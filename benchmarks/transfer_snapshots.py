"""How many generator steps a LoRA transfer (07) needs: score the transfer's EMA snapshots along its training.

07's transfer of the teacher's style LoRA reaches the reference's style and halves the distance to it at 1 step, but
DMD's mode seeking costs diversity. The trainer's lr is constant after warm-up, so the snapshot at iteration N is
what a budget of N / (fake_updates + 1) generator steps would ship: scoring snapshots draws the curve of distance to
teacher+L@T, diversity and content over generator steps, in one run, on one held-out gate subset.

    python benchmarks/transfer_snapshots.py params/nano.yaml outputs/<run>/lora/transfer-<key>-train [more folders] \
        --iterations 100 200 400 600 1000 [--way teacher] [--n-prompts 32 --seeds 4] [--set run.name=<run>]

Several folders (transfers of the same source with other settings, e.g. lora_transfer.regression) are scored on the
same images: `--iterations 1000 --n-prompts 128` compares finished transfers on the whole gate set.

Prints one table and appends one line per snapshot to outputs/bench/transfer_snapshots.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from anima_lib import config, distill, lora, lora_survival, lora_transfer, models, report, worlds
from anima_lib.io import load_finite


def snapshot_lora(student: torch.nn.Module, snapshot: Path, rank: int, alpha: float) -> lora.LoraWeights:
    """L' as the transfer's EMA snapshot holds it (the trainable adapter of the generator, peft names)."""
    generator = copy.deepcopy(student).float()
    lora.add_adapter(generator, rank, alpha)
    ema = load_finite(snapshot)
    params = dict(generator.named_parameters())
    missing = [name for name in ema if name not in params]
    if missing:
        raise ValueError(f"{snapshot}: {len(missing)} tensors are not adapter parameters of the student "
                         f"(e.g. {missing[0]}): not a transfer snapshot for this student and rank")
    with torch.no_grad():
        for name, tensor in ema.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return lora.from_adapter(generator, rank, alpha)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("train_folders", type=Path, nargs="+", help="outputs/<run>/lora/transfer-<key>-train")
    parser.add_argument("--iterations", type=int, nargs="+", required=True, help="snapshots ema_<iteration> to score")
    parser.add_argument("--way", default="teacher", help="the source LoRA's way (06's LoRA the transfer started from)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    snapshots = {f"{folder.name.removesuffix('-train')} it{n}": folder / "checkpoints" / f"ema_{n:06d}.safetensors"
                 for folder in args.train_folders for n in args.iterations}
    absent = [str(p) for p in snapshots.values() if not p.is_file()]
    if absent:
        parser.error(f"--iterations: no snapshot {absent[0]}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    params = config.load_config(args.preset, args.overrides)
    world = worlds.load_world(params).with_gate(args.n_prompts, args.seeds)
    components = models.load_components(params)
    student = distill.load_student(params, components, "rcm", params.distill.checkpoint)
    source = lora_transfer.style_source(params, components, student, args.way)
    per_update = params.lora_transfer.fake_updates + 1
    arms = {label: lora.fused(student, [(snapshot_lora(student, path, source.lora.rank, source.lora.alpha),
                                                      1.0)]) for label, path in snapshots.items()}
    T = params.sampler.teacher_steps
    reference = lora.fused(components.transformer, [(source.lora, 1.0)])
    rows, _ = lora_survival.styled_rows(params, components, world, reference, student, arms, args.steps)
    names = lora_survival.SURVIVAL_METRICS[world.kind]
    ref = rows[f"teacher+lora@{T}"]
    table = {}
    out = config.resolve_path(params.run.output_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    for label, path in snapshots.items():
        n = int(path.stem.split("_")[1])
        for k in args.steps:
            row, bare = rows[f"{label}@{k}"], rows[f"student@{k}"]
            entry = {"generator_steps": n // per_update, "steps": k, "style_ratio": row[names["style"]] / ref[names["style"]],
                     "content_ratio": row[names["content"]] / ref[names["content"]],
                     "diversity_vs_student": row[names["diversity"]] / bare[names["diversity"]],
                     "diversity_vs_reference": row[names["diversity"]] / ref[names["diversity"]],
                     names["distance"]: row[names["distance"]], "strict_alignment": row.get("alignment"),
                     "clean_rate": row.get("clean_rate")}
            table[f"{label} @{k}"] = entry
            with open(out / "transfer_snapshots.jsonl", "a") as f:
                f.write(json.dumps({"folder": str(path.parent.parent), "iteration": n, "images": len(world.gate.image_prompt),
                                    **entry}) + "\n")
    print(report.markdown_table(table))
    print(f"reference teacher+lora@{T}: {names['diversity']} {ref[names['diversity']]:.2f}, {names['content']} "
          f"{ref[names['content']]:.3f}; eval {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
