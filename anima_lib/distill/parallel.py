"""Scale-out pieces of the distillation loop: FSDP2 sharding, per-block activation checkpointing, and the gathers and
scatters that keep checkpoints plain full state dicts whatever the world size (DESIGN.md §6).

FSDP2 (`distill.parallel: fsdp`): every transformer block, then the root, is `fully_shard`ed over all ranks; each rank
holds 1/W of the weights, gradients and Adam states, all-gathers a block's weights just for its forward/backward and
reduce-scatters its gradients by SUM (the losses are sums over the global batch, as in the DDP path). On CUDA the
forward runs in bf16 with fp32 master weights and fp32 reductions; on CPU (tests) everything stays fp32.
"""
from __future__ import annotations

import warnings

import torch

BLOCKS_ATTRIBUTE = "transformer_blocks"   # diffusers DiTs (CosmosTransformer3DModel) keep their blocks here


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    return list(getattr(module, BLOCKS_ATTRIBUTE, []))


def mixed_precision(device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()   # CPU: fp32 throughout (bf16 CPU matmuls are slow and the tests compare to fp32)


def shard(module: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """FSDP2 in place: each transformer block its own unit (one block's weights gathered at a time), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision(device)
    for block in _blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)            # SUM, not FSDP's default mean: losses are global sums
            unit.set_force_sum_reduction_for_comms(True)    # plain SUM collectives (gloo has no PREMUL_SUM)
    # diffusers returns a permuted view; the TrigFlow wrapper only reads it (out-of-place), which is what FSDP asks
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return module


def checkpoint_activations(module: torch.nn.Module) -> None:
    """Recompute each transformer block in backward instead of storing its activations. diffusers checkpoints a block
    only when grad is enabled, so the no-grad passes (the JVP tangent, teacher calls, rollouts) never run under it."""
    if not hasattr(module, "enable_gradient_checkpointing") or not _blocks(module):
        raise ValueError(f"distill.activation_checkpointing: {type(module).__name__} has no transformer blocks to "
                         f"checkpoint (a diffusers transformer is expected)")
    module.enable_gradient_checkpointing()   # torch.utils.checkpoint(use_reentrant=False) around every block


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def full_tensors(tensors: dict, keep: bool) -> dict:
    """Whole CPU copies of possibly sharded tensors. Collective under FSDP (every rank must call it); only a rank
    with `keep` holds the result, one gathered tensor at a time otherwise."""
    out = {}
    for name, tensor in tensors.items():
        whole = tensor.full_tensor() if is_sharded(tensor) else tensor
        if keep:
            out[name] = whole.detach().cpu().contiguous()
    return out


def placed_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` where `like` lives: this rank's shard of it when `like` is sharded (every rank read the same file, so
    each takes its own rows without communication), else `whole` on like's device."""
    if not is_sharded(like):
        return whole.to(like.device)
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def grad_norm(params) -> float:
    """Global L2 norm of the gradients; for sharded gradients the squares are summed over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if not is_sharded(grads[0]):
        return float(torch.stack([g.detach().norm() for g in grads]).norm())
    import torch.distributed as dist
    squares = torch.stack([g.to_local().detach().double().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(squares)
    return float(squares.sqrt())
