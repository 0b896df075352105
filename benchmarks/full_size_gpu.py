"""The full-size Anima DiT on a lent GPU, in one run of at most ~8 minutes: what the studio's box will see.

Random-initialised 2B DiT (the real config, `models.ANIMA_2B_TRANSFORMER`) at 1024² (128² latents, 4,096 tokens),
bf16, batch 1, 512 context tokens. Prints, each with its peak GPU memory:
  * a teacher step (CFG: two DiT calls) and student@1 (one call), median of a few repeats;
  * one rCM student iteration and one critic iteration with the finite-difference tangent and with the JVP, through
    the real trainer (`distill.trainer.Distiller`, activation checkpointing on). With several GPUs under torchrun the
    same script runs the trainer sharded with FSDP2 (`--parallel fsdp`); on one GPU the trainer runs unsharded
    (FSDP2 over one rank shards nothing);
  * packing the DiT to 4-bit MLX-affine g32 with the shipped policy (`quant.packed.quantize_model`).

    .venv/bin/python benchmarks/full_size_gpu.py                       # on the GPU box (or the device tool)
    .venv/bin/torchrun --nproc_per_node=8 benchmarks/full_size_gpu.py --parallel fsdp --skip-sampling --skip-packing
    .venv/bin/python benchmarks/full_size_gpu.py --device cpu --layers 1 --image-size 128 --repeats 1   # dry run
A part that runs out of memory is reported as such and the rest still runs.
"""
import argparse
import copy
import json
import statistics
import time

import torch

from anima_lib import distill, models
from anima_lib.distill import trainer
from anima_lib.quant import ledger, packed


class RandomLatents:
    """Distillation data for the benchmark: fresh bf16-range latents and contexts, batch b a pure function of b."""

    def __init__(self, latent_shape, context_shape):
        self.latent_shape, self.context_shape = latent_shape, context_shape

    def batch(self, batch_index, batch_size, rank=0, world_size=1):
        generator = torch.Generator().manual_seed(batch_index)
        x0 = torch.randn(batch_size, *self.latent_shape, generator=generator)[rank::world_size]
        context = torch.randn(batch_size, *self.context_shape, generator=generator)[rank::world_size]
        return {"x0": x0, "context": context, "negative": torch.zeros(1, *self.context_shape)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(name, fn, device, repeats, results):
    """Median wall time and peak memory of fn(); an out-of-memory is a result, not a crash."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        fn()  # warm-up (kernels, allocator)
        synchronize(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        peak = round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None
        results[name] = {"seconds": round(statistics.median(times), 4), "peak_GB": peak}
    except torch.OutOfMemoryError as exc:
        results[name] = {"out_of_memory": str(exc).splitlines()[0][:160]}
    print(f"{name}: {results[name]}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=models.ANIMA_2B_TRANSFORMER["num_layers"])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    process = distill.start_process(args.device)
    device = process.device
    dtype = torch.bfloat16
    started = time.perf_counter()
    from diffusers import CosmosTransformer3DModel
    config = {**models.ANIMA_2B_TRANSFORMER, "num_layers": args.layers}
    with torch.device(device):
        teacher = CosmosTransformer3DModel(**config)
    models.cast_floating(teacher, dtype).eval().requires_grad_(False)
    side = args.image_size // 8                                   # the Qwen-Image VAE downsamples 8x
    latent_shape, context_shape = (config["in_channels"], 1, side, side), (512, config["text_embed_dim"])
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "parameters": models.count_parameters(teacher), "image_size": args.image_size,
               "tokens": (side // 2) ** 2, "ranks": process.world_size}
    generator = torch.Generator().manual_seed(0)
    x = models.randn((1, *latent_shape), generator, device, dtype)
    context = models.randn((1, *context_shape), generator, device, dtype)
    sigma = torch.full((1,), 0.5, device=device, dtype=dtype)

    def velocity(model):
        return lambda: models.transformer_velocity(model, x, sigma, context)

    if not args.skip_sampling:
        with torch.no_grad():
            measured("teacher step (CFG, 2 calls)", lambda: (velocity(teacher)(), velocity(teacher)()), device,
                     args.repeats, results)
            measured("student@1 (1 call)", velocity(teacher), device, args.repeats, results)

    data = RandomLatents(latent_shape, context_shape)
    for tangent in ("fd", "jvp"):
        if args.parallel == "fsdp" and tangent == "jvp":
            results[f"rCM iteration ({tangent})"] = {"skipped": trainer.JVP_WITH_FSDP}
            continue
        cfg = trainer.DistillConfig(method="rcm", iterations=10, batch_size=process.world_size, lr=1e-6,
                                    fake_lr=2e-7, checkpoint_every=10**6, parallel=args.parallel,
                                    activation_checkpointing=True, net_dtype="bfloat16")
        cfg.rcm.tangent, cfg.rcm.fd_delta = tangent, 0.05
        student = copy.deepcopy(teacher).float()   # fp32 master weights; the forward casts to the net dtype
        distiller = trainer.Distiller(lambda xx, s, c: models.transformer_velocity(teacher, xx, s, c), student,
                                      lambda m, xx, s, c: models.transformer_velocity(m, xx, s, c), data, cfg,
                                      f"/tmp/full_size_gpu_unused_{tangent}", process.rank, process.world_size)
        batch = distiller._on_device(data.batch(0, cfg.batch_size, process.rank, process.world_size))
        measured(f"rCM student iteration ({tangent})", lambda: distiller._student_step(batch), device, 1, results)
        measured(f"rCM critic iteration ({tangent})", lambda: distiller._critic_step(batch), device, 1, results)
        del distiller, student

    if not args.skip_packing and process.rank == 0:
        t0 = time.perf_counter()
        quantized, chosen, _ = packed.quantize_model(copy.deepcopy(teacher), ledger.DIT_POLICY, method="rerround")
        synchronize(device)
        results["4-bit packing (policy, rerround)"] = {"seconds": round(time.perf_counter() - t0, 2),
                                                      "layers": len(chosen)}
        print(f"4-bit packing: {results['4-bit packing (policy, rerround)']}", flush=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    if process.rank == 0:
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
