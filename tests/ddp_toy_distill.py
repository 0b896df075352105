"""Run by test_distill under torchrun (2 gloo processes) and in one process: the toy rCM run, weights saved per rank."""
import copy
import os
import sys

import torch
from safetensors.torch import save_file

from anima_lib import toy
from anima_lib.distill import trainer


def main(out_dir: str) -> None:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    field = toy.GaussianMixtureField.default_2d()
    student = toy.fit_to_field(toy.ToyVelocityMLP(seed=0), field, steps=200, seed=0)
    cfg = trainer.DistillConfig(method="rcm", iterations=30, batch_size=64, lr=1e-3, fake_lr=2e-4, warmup_steps=5,
                                checkpoint_every=10)
    cfg.rcm.guidance_scale = 1.0
    distiller = trainer.Distiller(field.velocity, copy.deepcopy(student), lambda m, x, s, c: m(x, s, c),
                                  toy.ToyData(field), cfg, os.path.join(out_dir, "ck"), rank=rank,
                                  world_size=world_size)
    distiller.train(progress=False)
    save_file({k: v.detach().contiguous() for k, v in distiller.student.state_dict().items()},
              os.path.join(out_dir, f"student_rank{rank}.safetensors"))
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
