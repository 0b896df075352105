"""Run by test_fsdp under torchrun (2 gloo processes, distill.parallel = fsdp) and imported by it for the one-process
reference: a short rCM run (sCM with the fd tangent, DMD, critic steps, CFG teacher) on a 2-block nano
CosmosTransformer3DModel with random latents. Usage: fsdp_toy_distill.py <checkpoint folder> <iterations> [...]."""
import copy
import sys
from pathlib import Path

import torch
from diffusers import CosmosTransformer3DModel

from anima_lib import models
from anima_lib.distill import rcm, start_process, trainer

LAYERS, LATENT, TOKENS = 2, (48, 1, 4, 4), 16


def tiny_transformer(seed: int = 0) -> CosmosTransformer3DModel:
    torch.manual_seed(seed)
    return CosmosTransformer3DModel(**{**models.NANO_TRANSFORMER, "num_layers": LAYERS})


class RandomLatents:
    """Batch b is a pure function of b (like the cache reader); rank r takes rows r::W."""

    def batch(self, batch_index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        g = torch.Generator().manual_seed(1000 + batch_index)
        x0 = torch.randn(batch_size, *LATENT, generator=g)
        context = torch.randn(batch_size, TOKENS, models.NANO_TRANSFORMER["text_embed_dim"], generator=g)
        negative = torch.zeros(1, TOKENS, models.NANO_TRANSFORMER["text_embed_dim"])
        return {"x0": x0[rank::world_size], "context": context[rank::world_size], "negative": negative}


def distiller(folder, iterations: int, parallel: str = "fsdp", rank: int = 0, world_size: int = 1,
              activation_checkpointing: bool = False) -> trainer.Distiller:
    teacher = tiny_transformer().eval().requires_grad_(False)
    cfg = trainer.DistillConfig(method="rcm", iterations=iterations, batch_size=4, lr=1e-4, fake_lr=2e-5,
                                warmup_steps=2, student_every=2, checkpoint_every=4, parallel=parallel,
                                activation_checkpointing=activation_checkpointing,
                                rcm=rcm.RCMConfig(tangent="fd", guidance_scale=2.0, max_rollout=2))

    def teacher_fn(x, s, context):
        return models.transformer_velocity(teacher, x, s, context)

    return trainer.Distiller(teacher_fn, copy.deepcopy(teacher), models.transformer_velocity, RandomLatents(), cfg,
                             Path(folder), rank=rank, world_size=world_size)


def main(runs: list[tuple[str, int]]) -> None:
    """Each (folder, iterations) trains under FSDP from scratch, or resumes what the folder holds."""
    torch.set_num_threads(1)
    process = start_process("cpu")
    for folder, iterations in runs:
        d = distiller(folder, iterations, "fsdp", process.rank, process.world_size, activation_checkpointing=True)
        assert d.sharded == (process.world_size > 1)
        if d.sharded:   # each rank holds about half of every trained network (and of its Adam states)
            for module in (d.student, d.fake):
                local = sum(p.to_local().numel() for p in module.parameters())
                assert local <= 0.51 * sum(p.numel() for p in module.parameters())
        d.train(progress=False)
    if process.world_size > 1:
        torch.distributed.barrier()   # no rank tears gloo down while the other still has work in flight
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    main([(args[i], int(args[i + 1])) for i in range(0, len(args), 2)])
