"""Distillation cost on the nano preset, measured in one run (ratios, not absolute promises):

  * one rCM student step, one rCM critic step and the average rCM iteration (F = student_every) versus one teacher
    flow-matching training step of the DiT, all at the same batch;
  * sampling wall time: student@1 (one call, no CFG) versus teacher@20 with CFG (40 calls), same images.

    .venv/bin/python benchmarks/distill_cost.py [--batch 32] [--images 512] [--threads 2] [--repeats 5]
Needs a cache for the run (notebook 01_cache or `anima cache build params/nano.yaml`).
"""
import argparse
import copy
import json
import statistics
import time

import torch

from anima_lib import config, distill, flow_training, gate, models


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = config.load_config(args.preset, args.overrides + [f"distill.batch_size={args.batch}"])
    components = models.load_components(params)
    distiller = distill.build_distiller(params, "rcm", components, log_to_file=False)
    distiller.dir = distiller.dir.with_name("benchmark_unused")  # never writes: no save() is called here
    batch = distiller.data.batch(0, args.batch)
    student_s = timed(lambda: distiller._student_step(batch), args.repeats)
    critic_s = timed(lambda: distiller._critic_step(batch), args.repeats)
    every = params.distill.student_every

    # the teacher's own training step: flow matching on the DiT with the same batch and context
    trainee = copy.deepcopy(components.transformer).float().train().requires_grad_(True)
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)

    def teacher_step():
        sigma = torch.rand(args.batch, generator=generator)
        noise = torch.randn(batch["x0"].shape, generator=generator)
        loss = flow_training.flow_matching_loss(lambda x, s, c: models.transformer_velocity(trainee, x, s, c),
                                                batch["x0"], batch["context"], sigma, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher_train_s = timed(teacher_step, args.repeats)

    seeds = 4
    sample_params = config.load_config(args.preset, args.overrides + [f"gate.n_prompts={max(1, args.images // seeds)}",
                                                                      f"gate.seeds_per_prompt={seeds}"])
    gate_set = gate.gate_set(sample_params)
    student = copy.deepcopy(components.transformer).float().eval()
    n = len(gate_set.image_prompt)
    student_1 = timed(lambda: gate.sample_student(student, components, sample_params, gate_set, 1), 2)
    student_4 = timed(lambda: gate.sample_student(student, components, sample_params, gate_set, 4), 2)
    teacher_20 = timed(lambda: gate.sample_teacher(components, sample_params, gate_set, 20), 1)
    results = {
        "threads": args.threads, "batch": args.batch,
        "teacher flow-matching step s": teacher_train_s,
        "rCM student step s": student_s, "rCM critic step s": critic_s,
        "rCM student step / teacher step": student_s / teacher_train_s,
        "rCM critic step / teacher step": critic_s / teacher_train_s,
        f"rCM iteration (1 student + {every - 1} critic) / {every} teacher steps":
            (student_s + (every - 1) * critic_s) / (every * teacher_train_s),
        "images": n,
        "student@1 images/s": n / student_1, "student@4 images/s": n / student_4,
        "teacher@20 (CFG) images/s": n / teacher_20,
        "speed-up student@1 vs teacher@20": teacher_20 / student_1,
        "speed-up student@4 vs teacher@20": teacher_20 / student_4,
        "network calls teacher@20 / student@1": 40,
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
