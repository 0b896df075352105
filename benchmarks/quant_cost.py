"""Quantization at full size, measured in one run on this CPU (ratios from one run):

  * a full-size random-init Anima DiT (bf16, real config) quantized with the DiT policy: quantize time, packed file
    size against the ledger's prediction (goal: within 1%) and against bf16;
  * loading it: peak RSS during load against steady RSS after load, for the pre-packed checkpoint and for the
    quantize-at-load alternative (each in a fresh process; RSS above the process's baseline after imports);
  * one 2048x8192 layer: dequantize-and-matmul time against a bf16 matmul.

    .venv/bin/python benchmarks/quant_cost.py [--out /tmp/anima_q] [--threads 2] [--skip-baseline]
Needs about 10 GB of RAM and 6 GB of disk; a few minutes on 2 cores.
"""
import argparse
import json
import time
from pathlib import Path

import torch


def build(args) -> dict:
    """A full-size random-init DiT in bf16, its bf16 file (unless --skip-baseline), quantized and packed."""
    from diffusers import CosmosTransformer3DModel
    from safetensors.torch import save_file
    from anima_lib import models
    from anima_lib.quant import ledger, packed
    results = {}
    # full-size DiT, random init directly in bf16 (N(0, 0.02): the numbers only need a realistic spread)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = CosmosTransformer3DModel(**models.ANIMA_2B_TRANSFORMER)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    results["init_s"] = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    results["dit_params"] = params
    bf16_path = args.out / "dit_bf16.safetensors"
    if not args.skip_baseline:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bf16_path)
        results["bf16_file_bytes"] = bf16_path.stat().st_size
    predicted = ledger.module_bytes(model, ledger.DIT_POLICY)["bytes"]
    t0 = time.perf_counter()
    model, chosen, kept = packed.quantize_model(model, ledger.DIT_POLICY)
    results["quantize_s"] = time.perf_counter() - t0
    packed.save_packed(model, args.out / "dit_packed", ledger.DIT_POLICY, chosen, kept,
                       model_config=models.ANIMA_2B_TRANSFORMER)
    size = (args.out / "dit_packed" / packed.WEIGHTS).stat().st_size
    results.update({"packed_file_bytes": size, "ledger_predicted_bytes": predicted,
                    "file / ledger": size / predicted, "packed / bf16 (2 B per param)": size / (2 * params),
                    "quantized_linears": len(chosen), "kept_linears": len(kept)})
    del model
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anima_q"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true", help="skip writing and loading the 4 GB bf16 file")
    parser.add_argument("--reuse", action="store_true", help="reuse the files (and build numbers) of an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from anima_lib.quant import mlx_affine

    results = {"threads": args.threads}
    args.out.mkdir(parents=True, exist_ok=True)
    built = args.out / "build.json"
    if args.reuse and built.is_file():  # the files of an earlier run: only the loads and the matmul are re-measured
        results.update(json.loads(built.read_text()))
    else:
        results.update(build(args))
        built.write_text(json.dumps(results))
    bf16_path = args.out / "dit_bf16.safetensors"

    def load(kind, path):  # each in a fresh process (anima_lib.quant.load_memory)
        from anima_lib.quant import ledger, load_memory
        r = load_memory.measure(kind, path, args.threads, ledger.DIT_POLICY if kind == "bf16" else None)
        return {"peak_above_base_GB": (r["peak"] - r["base"]) / 1e9,
                "right_after_load_above_base_GB": (r["after_load"] - r["base"]) / 1e9,
                "steady_above_base_GB (every tensor touched)": (r["steady"] - r["base"]) / 1e9,
                "peak / steady": (r["peak"] - r["base"]) / (r["steady"] - r["base"]), "load_s": r["load_s"]}

    results["load pre-packed"] = load("packed", args.out / "dit_packed")
    if not args.skip_baseline:
        results["load bf16 + quantize at load"] = load("bf16", bf16_path)

    # the nano teacher's DiT (the student has its shape) packed with the same policy
    import tempfile
    from anima_lib import config, models
    from anima_lib.quant import ledger, packed
    nano = models.load_components(config.load_config("nano")).transformer
    nano_bf16 = 2 * sum(p.numel() for p in nano.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        nano_q, chosen, kept = packed.quantize_model(nano, ledger.DIT_POLICY)
        packed.save_packed(nano_q, Path(tmp), ledger.DIT_POLICY, chosen, kept)
        results["nano DiT packed / bf16"] = (Path(tmp) / packed.WEIGHTS).stat().st_size / nano_bf16

    # one 2048 x 8192 layer (the MLP down projection's shape): dequantize + matmul vs bf16 matmul
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(2048, 8192, generator=generator).mul_(0.02).to(torch.bfloat16)
    x = torch.randn(256, 8192, generator=generator).to(torch.bfloat16)
    words, scales, biases = mlx_affine.quantize(weight, 32, 4)

    def best_of(fn, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    bf16_s = best_of(lambda: x @ weight.T)
    deq_s = best_of(lambda: x @ mlx_affine.dequantize(words, scales, biases, 32, 4, torch.bfloat16).T)
    results.update({"matmul bf16 s": bf16_s, "dequantize+matmul s": deq_s, "dequantize+matmul / bf16": deq_s / bf16_s})
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
