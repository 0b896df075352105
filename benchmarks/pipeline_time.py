"""Where the time of a pipeline run goes: per notebook, and inside each notebook per training loop, read from what a
finished run wrote (no estimates): the runner's wall time of each notebook (reports/<date>/<run>/metrics.json), each
distillation method's log (outputs/<run>/checkpoints/<method>/log.jsonl: wall_s of its last iteration), each adapter's
manifest (outputs/<run>/lora/**/manifest.json: wall_s, steps). The rest of a notebook is sampling, scoring, loading.

    .venv/bin/python benchmarks/pipeline_time.py nano            # the latest report of run "nano"
    .venv/bin/python benchmarks/pipeline_time.py nano --root /path/to/checkout

A loop resumed across invocations reports the wall time its checkpoint recorded (the sum of its invocations). The
"training loops" total counts time when loops ran side by side once (the union of their intervals).
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def latest_report(root: Path, run: str) -> Path:
    found = sorted((root / "reports").glob(f"*/{run}/metrics.json"))
    if not found:
        sys.exit(f"no reports/<date>/{run}/metrics.json under {root}: run `anima run <preset> --set run.name={run}` first")
    return found[-1]


def distill_loops(run_dir: Path) -> dict[str, dict]:
    loops = {}
    for log in sorted((run_dir / "checkpoints").glob("*/log.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if records:
            kinds = {}
            for record in records:
                kinds[record.get("kind", "step")] = kinds.get(record.get("kind", "step"), 0) + 1
            steps = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            loops[f"02 distill {log.parent.name}"] = {"wall_s": records[-1]["wall_s"], "steps": steps,
                                                      "end": log.stat().st_mtime}
    return loops


def adapter_loops(run_dir: Path) -> dict[str, dict]:
    loops = {}
    for manifest in sorted((run_dir / "lora").rglob("manifest.json")):
        record = json.loads(manifest.read_text())
        if "wall_s" in record:
            name = str(manifest.parent.relative_to(run_dir / "lora"))
            stage = "03 deturbo" if name.startswith("deturbo") else "06 lora" if name.startswith("style") else "07 transfer"
            loops[f"{stage} {name}"] = {"wall_s": record["wall_s"], "steps": f"{record.get('steps', record.get('generator_steps', '?'))} steps",
                                        "end": manifest.stat().st_mtime}
    return loops


def covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) intervals: loops that ran side by side (run.jobs) count once. A
    loop's end is its manifest's (or log's) modification time, its start that minus its wall time."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run.name of a finished run")
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout that ran it (default: this one)")
    args = parser.parse_args()
    report = latest_report(args.root, args.run)
    notebooks = {name: nb for name, nb in json.loads(report.read_text()).items() if isinstance(nb, dict)}
    total = sum(nb.get("wall_s") or 0 for nb in notebooks.values())
    print(f"{report.relative_to(args.root)}: {total / 60:.1f} min in notebooks\n")
    print(f"{'notebook':<22}{'status':<12}{'min':>7}{'share':>8}")
    for name, nb in notebooks.items():
        wall = nb.get("wall_s") or 0
        print(f"{name:<22}{nb.get('status', '?'):<12}{wall / 60:>7.1f}{wall / max(total, 1e-9):>8.0%}")
    run_dir = args.root / "outputs" / args.run
    loops = distill_loops(run_dir) | adapter_loops(run_dir)
    print(f"\n{'training loop':<52}{'min':>7}{'share':>8}  steps")
    for name, loop in sorted(loops.items()):
        print(f"{name:<52}{loop['wall_s'] / 60:>7.1f}{loop['wall_s'] / max(total, 1e-9):>8.0%}  {loop['steps']}")
    trained = covered([(loop["end"] - loop["wall_s"], loop["end"]) for loop in loops.values()])
    print(f"\ntraining loops {trained / 60:.1f} min ({trained / max(total, 1e-9):.0%}); the rest "
          f"{(total - trained) / 60:.1f} min is sampling, scoring, loading and kernel start")


if __name__ == "__main__":
    main()
