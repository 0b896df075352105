"""Run by test_crash_resume: the toy rCM run in its own process, so the test can SIGKILL it at random moments and
start it again; each start resumes from the checkpoint folder. Writes ema_final.safetensors when training is done."""
import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from anima_lib import toy
from anima_lib.distill import trainer

ITERATIONS, CHECKPOINT_EVERY = 120, 7   # a checkpoint every 7 iterations: kills land before, inside and after saves


def distiller(folder: Path) -> trainer.Distiller:
    field = toy.GaussianMixtureField.default_2d()
    student = toy.fit_to_field(toy.ToyVelocityMLP(width=64, seed=0), field, steps=100, seed=0)
    cfg = trainer.DistillConfig(method="rcm", iterations=ITERATIONS, batch_size=64, lr=1e-3, fake_lr=2e-4,
                                warmup_steps=5, checkpoint_every=CHECKPOINT_EVERY)
    cfg.rcm.guidance_scale = 1.0
    return trainer.Distiller(field.velocity, copy.deepcopy(student), lambda m, x, s, c: m(x, s, c),
                             toy.ToyData(field), cfg, folder / "ck")


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    folder = Path(out_dir)
    d = distiller(folder)
    print(f"start at iteration {d.state.iteration}", flush=True)
    d.train(progress=False)
    save_file(d.ema.shadow, folder / "ema_final.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
