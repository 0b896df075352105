"""Which 4-bit method keeps fine detail (issue 20 item 3), measured on the shipped nano teacher (the student's class):
its DiT quantized by each method, sampled as teacher@T on a gate set, read by the detail-strict reader (eye count)
and the probe, each row paired with the full-precision teacher on the same prompts and noise.

  calibration   the teacher's own 20-step CFG rollouts of 16 training prompts (cache prompt sampler, not gate prompts)
  policy        DIT_POLICY (adaLN 8-bit, embedders / final layer bf16); "+detail": also 8 bits for the block roles
                whose 4-bit alone drops the eyes probability (low end of the 90% paired interval, as the stage
                decides) by more than --detail-threshold at teacher@T on --detail-prompts prompts of a gate set drawn
                from --detail-seed (held out from the scored seeds)
  rows          fp and every method in --methods, with and without +detail; scored on gate sets of --prompts
                prompts x 2 seeds for each run.seed in --seeds
  bytes         nano packed file and the 2B ledger (planned scenario with the DiT under that policy)

    .venv/bin/python benchmarks/quant_detail.py [--steps 20] [--prompts 64] [--seeds 0 1] [--out /tmp/quant_detail]
About 45 minutes on 2 idle cores at the defaults (a teacher@20 row of 128 images is ~100 s).
"""
import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from anima_lib import config, flow, gate, metrics, models, sampler
from anima_lib.cache import nano_prompts
from anima_lib.nano_world import detail_reader
from anima_lib.nano_world.probes import load_probe
from anima_lib.quant import calibrated, ledger, packed, policy as quant_policy, stage

FMT = {"bits": 4, "group_size": 32}


def calibration_grams(params, components, teacher, n_prompts=16, steps=20):
    prompts = [r.prompt for r in nano_prompts(n_prompts, params.run.seed)]
    context, negative = components.encode_prompts(prompts), components.encode_prompts([params.sampler.negative_prompt])
    noise = torch.randn(n_prompts, *components.latent_shape(params.gate.image_size),
                        generator=torch.Generator().manual_seed(123))
    sigmas = flow.teacher_sigmas(steps, params.sampler.shift)
    layers = [n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)]
    return calibrated.collect_grams(teacher, lambda m: sampler.euler_sample(
        models.velocity_fn(m), noise, sigmas, context, negative, params.sampler.guidance_scale), layers)


def sample(components, params, gate_set, model, steps):
    return gate.sample_teacher(dataclasses.replace(components, transformer=model), params, gate_set, steps)


def eyes_probability(reader, images, gate_set) -> torch.Tensor:
    values = detail_reader.READ_VALUES["eyes"]
    target = torch.tensor([values.index(gate_set.attributes[p]["eyes"]) for p in gate_set.image_prompt])
    return detail_reader.read_details(reader, metrics.as_float(images)).probs["eyes"].gather(1, target[:, None])[:, 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="teacher Euler steps of every row")
    parser.add_argument("--prompts", type=int, default=64, help="gate prompts per scored seed (2 images each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run.seed of each scored gate set")
    parser.add_argument("--methods", nargs="+", default=["minmax", "search", "awq", "gptq"])
    parser.add_argument("--detail-methods", nargs="+", default=["search", "awq"], help="methods also run +detail")
    parser.add_argument("--detail-prompts", type=int, default=32)
    parser.add_argument("--detail-seed", type=int, default=7919)
    parser.add_argument("--detail-threshold", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/quant_detail"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    params = config.load_config("nano", [])
    components = models.load_components(params)
    teacher = components.transformer.float()
    grams = calibration_grams(params, components, teacher)
    reader, probe = detail_reader.load_detail_reader(), metrics.ProbeReader(load_probe())
    chosen, _ = packed.resolve_policy(teacher, ledger.DIT_POLICY)
    n_blocks = len(teacher.transformer_blocks)

    # the detail policy: one role at 4 bits at a time (awq measured where its scales are folded in)
    held_out = config.load_config("nano", [f"run.seed={args.detail_seed}"])   # another seed: held-out prompts, noise
    held_set = gate.gate_set(held_out, n_prompts=args.detail_prompts, seeds_per_prompt=1)
    roles = quant_policy.role_patterns([n for n, f in chosen.items() if f == FMT])
    policies = {"": ledger.DIT_POLICY}
    drops_by_method = {}
    for method in args.detail_methods:
        model, method_grams = teacher, grams
        if method == "awq":
            model, method_grams = calibrated.awq_folded(teacher, grams, chosen)
        per_image = quant_policy.detail_drop(
            model, lambda m: eyes_probability(reader, sample(components, held_out, held_set, m, args.steps), held_set),
            FMT, method, method_grams, roles)
        low = stage.drop_lower_bounds(per_image)
        drops_by_method[method] = {role: {"mean": float(d.mean()), "90% low end": low[role]}
                                   for role, d in per_image.items()}
        policies[f"+detail({method})"] = quant_policy.policy_from_detail(low, ledger.DIT_POLICY,
                                                                          args.detail_threshold)
    print(json.dumps({"role drops": drops_by_method}, indent=1), flush=True)

    def build(method, policy):
        return packed.quantize_model(copy.deepcopy(teacher), policy, method, torch.bfloat16, grams)

    rows = {"fp": ("fp", None)}
    for method in args.methods:
        rows[method] = (method, ledger.DIT_POLICY)
        if method in args.detail_methods:
            rows[f"{method}+detail"] = (method, policies[f"+detail({method})"])
    results = {}
    for seed in args.seeds:
        scored = config.load_config("nano", [f"run.seed={seed}"])
        gate_set = gate.gate_set(scored, n_prompts=args.prompts, seeds_per_prompt=2)
        per_image = {}
        for row, (method, policy) in rows.items():
            model = teacher if policy is None else build(method, policy)[0].float()
            images = sample(components, scored, gate_set, model, args.steps)
            reading = detail_reader.read_details(reader, metrics.as_float(images))
            strict = detail_reader.per_image_strict(reading, gate_set.attributes, gate_set.image_prompt)
            per_image[row] = {"eyes right": strict["right_eyes"], "strict aligned": strict["strict_aligned"],
                              "eyes probability": eyes_probability(reader, images, gate_set)}
            probe_scores = metrics.score_images(probe.read(images), gate_set.attributes, gate_set.image_prompt)
            out = {"probe alignment": probe_scores["alignment"]}
            for key, values in per_image[row].items():
                paired = metrics.paired_difference(per_image["fp"][key], values, gate_set.image_prompt)
                drop, interval = paired["difference"], paired["ci"]
                out[key] = float(values.mean())
                out[f"{key} drop vs fp [90% CI]"] = [round(drop, 4), [round(v, 4) for v in interval]]
            out["eyes confusion (prompted 1/2/3 x read 1/2/3/other)"] = detail_reader.confusion_matrices(
                reading, gate_set.attributes, gate_set.image_prompt)["eyes"]["counts"]
            results.setdefault(row, {})[f"seed {seed}"] = out
            print(json.dumps({row: {f"seed {seed}": out}}), flush=True)

    for row, (method, policy) in rows.items():
        if policy is None:
            continue
        quantized, chosen_row, kept = build(method, policy)
        with tempfile.TemporaryDirectory() as tmp:
            packed.save_packed(quantized, Path(tmp), policy, chosen_row, kept, dict(components.transformer.config))
            nano_bytes = (Path(tmp) / packed.WEIGHTS).stat().st_size
        results[row]["bytes"] = {"nano packed file": nano_bytes,
                                 "2B planned total GB": ledger.planned_total_gb(policy, n_blocks),
                                 "8-bit roles added": sorted(set(policy["layers"]) - set(ledger.DIT_POLICY["layers"]))}
    results["_wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
