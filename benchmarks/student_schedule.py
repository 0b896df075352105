"""The rCM student's few-step schedule: alignment of the run's student at 2 and 4 steps for candidate
`sampler.student_mid_times`, measured in one run on a prompt/noise set held out from the gate's.

The gate draws its prompts and noise from `run.seed`; this script draws them from `--eval-seed` (default: another
seed), so choosing mid times here does not tune on the gate's own images. The served schedule does not change the
trained student when its rollouts have their own times (`distill.rollout_mid_times`, nano) or are drawn at random;
with `rollout_times: sampler` and no rollout_mid_times the student was trained at the served times, so a candidate
here is the old student at new times (retrain to compare like with like: issue 20 did, it read worse at 4 steps).

    .venv/bin/python benchmarks/student_schedule.py [--eval-seed 7] [--steps 2 4] [--schedule 1.3,1.0,0.6 ...]
    ... --late-checkpoint outputs/nano/checkpoints/rcm/ema_000500.safetensors --late-below 1.4
    ... --teacher --q4 --eval-seed 7 11 --schedule 1.45,1.25,0.9 --set gate.n_prompts=512 --set gate.seeds_per_prompt=2
        (issue 20's targets on 2,048 held-out images, with paired differences to the teacher, to 1 step and, --q4,
        of the 4-bit student to full precision)

`--late-checkpoint` locates which step of the chain a longer training degraded: the chain's steps that start at trig
time <= `--late-below` run another EMA snapshot (the first step stays the run's student). Diagnostic only: the phone
serves one student.
Needs 02_distill's rCM student for the run (`anima run params/nano.yaml --only 02_distill`).
"""
import argparse
import time
from typing import Optional

import torch

from anima_lib import config, distill, flow, gate, metrics, models, report
from anima_lib.nano_world import detail_reader
from anima_lib.nano_world.probes import load_probe
from anima_lib.quant import stage as quant_stage

DEFAULT_SCHEDULES = ["1.45,1.25,0.9", "1.3,1.0,0.6", "1.5,1.3,1.0", "1.4,1.2,0.9", "1.1,0.8,0.4", "1.0,0.6,0.3"]


class TimeSplitDiT(torch.nn.Module):
    """Two DiTs as one: calls at RF sigma <= `split_sigma` go to `late`, the others to `early` (the whole batch shares
    one time in the student sampler)."""

    def __init__(self, early: torch.nn.Module, late: torch.nn.Module, split_sigma: float):
        super().__init__()
        self.early, self.late, self.split_sigma = early, late, split_sigma

    @property
    def dtype(self):
        return self.early.dtype

    def forward(self, hidden_states, timestep, **kwargs):
        model = self.late if float(timestep.flatten()[0]) <= self.split_sigma else self.early
        return model(hidden_states=hidden_states, timestep=timestep, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--eval-seed", type=int, nargs="+", default=[7],
                        help="run.seed for the held-out prompts and noise; several: their sets are pooled")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--schedule", nargs="+", default=DEFAULT_SCHEDULES,
                        help="candidate mid times, comma-separated, decreasing in (0, pi/2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", action="store_true", help="also score teacher@sampler.teacher_steps (CFG) on the "
                                                                 "held-out set: the reference of the 0.97x target")
    parser.add_argument("--q4", action="store_true", help="also the run's quantized student (04_quantize) at the first "
                                                               "schedule, paired with full precision (issue 20 item 3)")
    parser.add_argument("--late-checkpoint", default=None, help="an EMA snapshot for the steps at trig time <= "
                                                                   "--late-below (diagnostic)")
    parser.add_argument("--late-below", type=float, default=1.4, help="trig time at or below which a step runs "
                                                                      "--late-checkpoint")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = config.load_config(args.preset, args.overrides)
    if params.run.seed in args.eval_seed or len(set(args.eval_seed)) < len(args.eval_seed):
        parser.error(f"--eval-seed {args.eval_seed}: each must differ from run.seed {params.run.seed} (the gate's own "
                     "set) and from the others")
    components = models.load_components(params)
    student = distill.load_student(params, components, "rcm", params.distill.checkpoint)
    if args.late_checkpoint:
        late = distill.load_student(params, components, "rcm", args.late_checkpoint)
        student = TimeSplitDiT(student, late, flow.trig_to_rf_time(args.late_below))
    reader = metrics.ProbeReader(load_probe())
    strict = detail_reader.load_detail_reader()  # the gate's detail-strict reading (eyes confident and right)
    quantized = quant_stage.load_quantized_student(params) if args.q4 else None
    if args.q4 and quantized is None:
        parser.error("--q4: the run has no quantized student (run 04_quantize first)")
    rows, strict_per_image, eyes_per_image = {}, {}, {}   # row -> per-image 0/1 readings, for paired differences

    def score(images, eval_set, row: str) -> dict:
        scores = metrics.score_images(reader.read(images), eval_set.attributes, eval_set.image_prompt)
        reading = detail_reader.read_details(strict, metrics.as_float(images))   # read once: scores and per image
        scores.update(detail_reader.detail_scores(reading, eval_set.attributes, eval_set.image_prompt))
        per_image = detail_reader.per_image_strict(reading, eval_set.attributes, eval_set.image_prompt)
        strict_per_image[row], eyes_per_image[row] = per_image["strict_aligned"], per_image["right_eyes"]
        return {"alignment": scores["alignment"], "alignment_ci": scores["alignment_ci"],
                "strict_alignment": scores["strict_alignment"], "strict_eyes": scores["strict_accuracy_eyes"],
                "eyes": scores["alignment_eyes"], "shape": scores["alignment_shape"],
                "clean_rate": scores["clean_rate"], "n_images": scores["n_images"]}

    def sample(schedule: Optional[str], steps: int, model=None):
        """The row's images over every --eval-seed set, pooled, and the pooled set (prompt indices offset per seed)."""
        images, pooled = [], gate.GateSet(prompts=[], attributes=[], image_prompt=[], image_seed=[])
        for seed in args.eval_seed:
            # load_config validates the schedule (decreasing, inside (0, pi/2)) before any sampling
            eval_params = config.load_config(args.preset, args.overrides + [f"run.seed={seed}"] + (
                [f"sampler.student_mid_times=[{schedule}]"] if schedule else []))
            eval_set = gate.gate_set(eval_params)
            if schedule is None:
                images.append(gate.sample_teacher(components, eval_params, eval_set, params.sampler.teacher_steps))
            else:
                images.append(gate.sample_student(model or student, components, eval_params, eval_set, steps,
                                                  precision=params.cache.precision))
            pooled.image_prompt += [p + len(pooled.prompts) for p in eval_set.image_prompt]
            pooled.image_seed += eval_set.image_seed
            pooled.prompts += eval_set.prompts
            pooled.attributes += eval_set.attributes
        return torch.cat(images), pooled

    if args.teacher:
        t0 = time.perf_counter()
        row = f"teacher@{params.sampler.teacher_steps}"
        images, eval_set = sample(None, params.sampler.teacher_steps)
        rows[row] = {**score(images, eval_set, row), "s": time.perf_counter() - t0}
    for schedule in args.schedule:
        for steps in args.steps:
            if steps == 1 and schedule != args.schedule[0]:
                continue  # one step has no mid times
            t0 = time.perf_counter()
            row = f"[{schedule}] @{steps}"
            images, eval_set = sample(schedule, steps)
            rows[row] = {**score(images, eval_set, row), "s": time.perf_counter() - t0}
            print(f"{schedule} @{steps}: alignment {rows[row]['alignment']:.3f}, strict "
                  f"{rows[row]['strict_alignment']:.3f}", flush=True)
    quant_pairs = {}
    for steps in args.steps if quantized is not None else ():
        row, full = f"[{args.schedule[0]}] q{params.quant.bits} @{steps}", f"[{args.schedule[0]}] @{steps}"
        images, eval_set = sample(args.schedule[0], steps, quantized)
        rows[row] = score(images, eval_set, row)
        if full in rows:   # issue 20 item 3: within 0.01 of full precision on strict alignment and on the eye count
            for reading, per_image in (("strict", strict_per_image), ("eyes right", eyes_per_image)):
                paired = metrics.paired_difference(per_image[row], per_image[full], eval_set.image_prompt)
                quant_pairs[f"{row} − {full}, {reading}"] = {
                    "difference": paired["difference"], "ci_low": paired["ci"][0], "ci_high": paired["ci"][1],
                    "target": "within ±0.01", "interval": metrics.interval_reading(paired, -0.01, 0.01)}
    late = f", steps at t <= {args.late_below} from {args.late_checkpoint}" if args.late_checkpoint else ""
    print(f"\nrCM student ({params.distill.checkpoint}{late}), eval seed(s) {args.eval_seed} pooled "
          f"(gate uses run.seed {params.run.seed}), {params.gate.n_prompts} prompts × "
          f"{params.gate.seeds_per_prompt} seeds")
    print(report.markdown_table(rows))
    full_precision = {r: v for r, v in strict_per_image.items() if f" q{params.quant.bits} " not in r}
    print("\n" + report.markdown_table(paired_rows(full_precision, eval_set.image_prompt,
                                                    f"teacher@{params.sampler.teacher_steps}", args.schedule[0])
                                         | quant_pairs))


def paired_rows(strict_per_image: dict, image_prompt: list[int], teacher_row: str, one_step_schedule: str) -> dict:
    """Issue 20's targets as paired differences of detail-strict alignment (same prompt and noise per image, 90%
    bootstrap over prompts): every student row minus the teacher (bar: -0.03 x teacher) and minus the 1-step row (bar:
    0), each read met / missed / undecided by its interval (metrics.interval_reading)."""
    one_step = f"[{one_step_schedule}] @1"
    bar = -0.03 * float(strict_per_image[teacher_row].float().mean()) if teacher_row in strict_per_image else None
    out = {}
    for row, values in strict_per_image.items():
        for other, low_bar in ((teacher_row, bar), (one_step, 0.0)):
            if row != other and other in strict_per_image and row != teacher_row:
                paired = metrics.paired_difference(values, strict_per_image[other], image_prompt)
                out[f"{row} − {other}"] = {"difference": paired["difference"], "ci_low": paired["ci"][0],
                                           "ci_high": paired["ci"][1], "target": f"≥ {low_bar:+.4f}",
                                           "interval": metrics.interval_reading(paired, low_bar)}
    return out


if __name__ == "__main__":
    main()
