"""What `run.jobs` buys on this CPU: style-LoRA training steps (06's loop, nano preset) timed in one run as one job
alone at all threads, then as `run.jobs` jobs side by side through `anima_lib.jobs.run_jobs` (threads shared).

    .venv/bin/python benchmarks/jobs_speed.py [--steps 40] [--threads 2] [--jobs 2]

Prints s/step of each and the ratio "time of the side-by-side jobs / time of one job alone": below `--jobs` means
running them side by side is faster than one after another. Needs an idle machine (other processes skew it).
"""
import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from anima_lib import config, jobs, lora_survival, models


def lora_steps_job(params, folder: str, components=None) -> dict:
    """06's teacher-way style LoRA (`train_style_lora`) trained from scratch in its own output folder; returns the
    training wall time its manifest records (a job for jobs.run_jobs: a worker loads its own models)."""
    params = dataclasses.replace(params, run=dataclasses.replace(params.run, output_dir=folder))
    components = components if components is not None else models.load_components(params)
    _, manifest = lora_survival.train_style_lora(params, components, "teacher", components.transformer, progress=False)
    return {"wall_s": manifest["wall_s"], "steps": manifest["steps"], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.output_dir={tmp}", f"run.threads={args.threads}", f"lora.steps={args.steps}",
                     "lora.checkpoint_every=1000000",
                     "lora.minutes=600"]
        alone_params = config.load_config("nano", overrides + ["run.jobs=1"])
        side_params = config.load_config("nano", overrides + [f"run.jobs={args.jobs}"])
        alone = jobs.run_jobs(alone_params, lora_steps_job, [{"folder": f"{tmp}/alone"}])[0]
        side = jobs.run_jobs(side_params, lora_steps_job, [{"folder": f"{tmp}/job{i}"} for i in range(args.jobs)])
        side_wall = max(r["wall_s"] for r in side)   # training only, as alone (loading and style data excluded)
    result = {"steps": args.steps, "alone_threads": alone["threads"], "alone_s_per_step": alone["wall_s"] / args.steps,
              "side_by_side_threads": [r["threads"] for r in side],
              "side_by_side_s_per_step": [r["wall_s"] / args.steps for r in side],
              "jobs": args.jobs, "side_by_side_over_alone": side_wall / alone["wall_s"]}
    print(json.dumps(result, indent=1))
    print(f"{args.jobs} jobs side by side took {result['side_by_side_over_alone']:.2f}x one job alone "
          f"(one after another: {args.jobs}x)")


if __name__ == "__main__":
    main()
