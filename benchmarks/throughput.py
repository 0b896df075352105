"""Throughput on the nano preset, measured in one run (ratios, not absolute promises):

  teacher sampling images/s at 1 and 20 steps (CFG), the cache writer's overhead over sampling alone, and the time
  to verify a cache.    .venv/bin/python benchmarks/throughput.py [--prompts 256] [--threads 2]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from anima_lib import cache, config, gate, models


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = config.load_config("nano", [f"gate.n_prompts={args.prompts // 4}", "gate.seeds_per_prompt=4"])
    components = models.load_components(params)
    gate_set = gate.gate_set(params)
    results = {"threads": args.threads, "images": len(gate_set.image_prompt)}
    for steps in (1, 20):
        gate.sample_teacher(components, params, gate_set, steps)          # warm-up
        t0 = time.perf_counter()
        gate.sample_teacher(components, params, gate_set, steps)
        results[f"teacher@{steps} images/s"] = len(gate_set.image_prompt) / (time.perf_counter() - t0)
    records = cache.nano_prompts(args.prompts, seed=1)
    cfg = cache.cache_config(params, "shipped")
    with tempfile.TemporaryDirectory() as tmp:
        # sampling alone: exactly what the writer computes per shard, without serializing or writing
        t0 = time.perf_counter()
        for shard in cache.shard_ids(records, cfg.shard_size):
            cache.compute_shard(components, shard, cfg)
        sampling_only = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = cache.build_cache(components, records, cfg, Path(tmp) / "c", progress=False)
        with_writer = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = cache.verify_cache(Path(tmp) / "c")
        verify_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (Path(tmp) / "c").glob("shard_*"))
    results.update({
        "cache prompts": args.prompts, "cache sampling-only s": sampling_only, "cache build s": with_writer,
        "cache writer overhead (build / sampling-only - 1)": with_writer / sampling_only - 1,
        "cache writer overhead (write_s / sample_s inside build)": stats["write_s"] / stats["sample_s"],
        "cache prompts/s": args.prompts / with_writer,
        "teacher NFE/s in cache": args.prompts * cfg.steps * 2 / stats["sample_s"],
        "cache MB": size / 1e6, "verify s": verify_s, "verify MB/s": size / 1e6 / verify_s,
        "verified": f"{len(report['ok'])}/{report['expected']}"})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
