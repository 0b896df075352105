"""Training-memory ledger for rCM on the real Anima DiT (2B), measured in one run on CPU:

  * parameter counts of the real architecture on the meta device;
  * activation bytes of ONE real-width transformer block (bf16, batch 1, 256 / 576 / 1024 image tokens: saved
    tensors by saved_tensors_hooks, transients by a live-bytes TorchDispatchMode), fitted in the token count and
    extrapolated to 4,096 tokens (1024^2); a 2-block real-width model checks that blocks compose;
  * the per-rank ledger for {DDP, FSDP2} x {1, 8 GPUs} x batch per rank {1..16} x checkpointing x tangent
    {jvp, fd}, whether it fits 80 GB / 141 GB (10 % headroom), the largest batch per rank, and ranks x
    accumulation to the rCM global batch 512; then the key conclusions.

    .venv/bin/python benchmarks/training_memory.py [--threads 2] [--teacher-sharded] [--check-4096] [--json out.json]
~30-40 s on 2 shared CPU cores (the optional --check-4096 measures the block at 4,096 tokens directly: ~2.5 min,
~9 GB of RAM). See anima_lib/distill/memory.py for the method.
"""
import argparse
import json
import time

from anima_lib.distill import memory as M


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=M.IMAGE_TOKENS_1024, help="image tokens (4096 = 1024^2)")
    parser.add_argument("--teacher-sharded", action="store_true", help="FSDP2 also shards the frozen teacher")
    parser.add_argument("--headroom", type=float, default=M.HEADROOM)
    parser.add_argument("--check-4096", action="store_true", help="also measure the block at 4,096 tokens directly")
    parser.add_argument("--json", default=None, help="write every number of this run here")
    args = parser.parse_args()
    started = time.perf_counter()
    kw = dict(tokens=args.tokens, teacher_sharded=args.teacher_sharded, headroom=args.headroom)

    counts = M.parameter_counts()
    print(f"# rCM training memory per rank, Anima DiT at {args.tokens} image tokens\n")
    print(f"Parameters (meta device): {counts.total:,} = {counts.blocks} blocks x {counts.per_block:,} + "
          f"{counts.outside_blocks:,} outside the blocks.\n")

    acts = M.measure_activations(threads=args.threads)
    print(f"## Measured activation coefficients ({acts.dtype}, per sample, one real-width block; "
          f"measured at {acts.tokens_measured} tokens in {acts.wall_s} s)\n")
    print(M.markdown(acts.coefficients(args.tokens)))
    print("\nRaw measurements (MB per sample; transients are peaks):\n")
    raw = [{"tokens": n, **{k: round(v / 1e6, 2) for k, v in q.items()}} for n, q in acts.measured.items()]
    print(M.markdown(raw))
    composition = M.validate_composition(acts, layers=2, side=16, threads=args.threads)
    print(f"\nChecks: {acts.checks}; a real-width 2-block model at 256 tokens keeps "
          f"{composition['measured'] / 1e6:.1f} MB, the ledger predicts {composition['predicted'] / 1e6:.1f} MB "
          f"(ratio {composition['ratio']:.4f}).")
    direct = None
    if args.check_4096:
        direct = M.check_extrapolation(acts, side=64, threads=args.threads)
        print("\nDirect measurement at 4,096 tokens vs extrapolation (MB): " + "; ".join(
            f"{k} {v['measured'] / 1e6:.1f} vs {v['predicted'] / 1e6:.1f} ({v['ratio']:.4f})"
            for k, v in direct.items()))

    rows = M.ledger_table(counts, acts, **kw)
    print(f"\n## Per-rank ledger (fits = total <= {1 - args.headroom:.0%} of the nominal capacity; teacher "
          f"{'sharded' if args.teacher_sharded else 'replicated'} under FSDP2)\n")
    print(M.markdown(rows, M.TABLE_COLUMNS))
    summary = M.fit_summary(counts, acts, **kw)
    print(f"\n## Largest batch per rank and the plan to the rCM global batch {M.RCM_GLOBAL_BATCH} "
          f"(ranks x batch/rank x accumulation)\n")
    print(M.markdown(summary))
    lines = M.conclusions(counts, acts, **kw)
    print("\n## Conclusions\n")
    print("\n".join(f"- {line}" for line in lines))
    print(f"\n(wall {time.perf_counter() - started:.0f} s, {args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": counts.__dict__, "activations": acts.to_dict(), "composition": composition,
                       "direct_4096": direct, "rows": rows, "summary": summary, "conclusions": lines,
                       "settings": vars(args)}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
