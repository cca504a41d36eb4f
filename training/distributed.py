"""Data-parallel training under torchrun (nanoGPT-style), e.g.

    torchrun --nproc_per_node 2 -m rlhfkit.training.cli sft ...

torchrun starts one process per rank and sets RANK, WORLD_SIZE and LOCAL_RANK; a trainer
then joins the process group (gloo on CPU, NCCL on CUDA with cuda:LOCAL_RANK), takes its
slice of every global batch, and torch's DistributedDataParallel (or FSDP2 with --fsdp)
reduces the gradients before each optimizer step, so the ranks' weights stay identical. Rank 0 alone writes checkpoints, metrics and progress
bars. Without torchrun the helpers for ranks and sums are no-ops or the identity (the
wrappers are not used then): one process trains exactly as it always has.

The process group lives as long as the process (a torchrun worker may run several trainers
one after the other): destroying and re-creating it between trainers can hang, when one
rank re-joins while another is still leaving.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (once per process, left at its exit) and return
    this rank's device: cuda:LOCAL_RANK on CUDA, else `device`. Without torchrun, `device` itself."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(cleanup)
    return device


def cleanup() -> None:
    """Leave the process group (init() arranges this for the end of the process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(items: list) -> list:
    """This rank's slice of a global batch: items rank, rank + world, ... (all of it in one process)."""
    return items[rank()::world_size()]


def _device() -> torch.device:
    # What collectives run on: NCCL moves CUDA tensors only, gloo CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch's DistributedDataParallel around `module` (which computes the whole loss in its
    forward, so the reducer sees every parameter used). It gives every rank rank 0's
    weights at once (a freshly initialised head then starts the same everywhere) and
    averages gradients over ranks in the backward pass of each synced forward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def fully_shard_module(module: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard) over `module`: each transformer block of
    every model inside it its own group (its weights gathered for its forward and backward
    only), then `module` as the root, which keeps the embeddings, final norms and heads in
    one group (tied embeddings must share one). Gradients are reduce-scattered, averaged
    over ranks as DDP's are; each rank keeps its shard of weights and optimizer state."""
    from torch.distributed.fsdp import fully_shard
    from transformers import PreTrainedModel

    blocks = {name for m in module.modules() if isinstance(m, PreTrainedModel) for name in (m._no_split_modules or [])}
    for sub in [m for m in module.modules() if type(m).__name__ in blocks]:
        fully_shard(sub)
    fully_shard(module)
    # FSDP2 makes the first module called its root, lazily. Rollouts call the policy's blocks
    # before the first training forward: initialise with `module` as the root now.
    module._get_fsdp_state()._lazy_init()
    return module


def _fsdp_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(module: torch.nn.Module) -> dict:
    """The unsharded weights of an FSDP2 module on rank 0, on the CPU ({} on the others;
    every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_fsdp_options(cpu_offload=True))


def full_optimizer_state(module: torch.nn.Module, optimizer) -> dict:
    """The optimizer state of an FSDP2 module, unsharded, on rank 0 (every rank calls it).
    Part of it is the live state (the step counts): save it at once."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_fsdp_options(cpu_offload=True))


def load_full_state(module: torch.nn.Module, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Rank 0's full weights and optimizer state into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _fsdp_options(broadcast_from_rank0=True)
    set_model_state_dict(module, weights if is_main() else {}, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state if is_main() else {}, options=options)


def all_sum(values: list) -> list[float]:
    """The sum over ranks of each of `values` (numbers or one-element tensors), as floats."""
    values = [float(v) for v in values]
    if dist.is_initialized():
        summed = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(summed)
        values = summed.tolist()
    return values


def all_max(value: float) -> float:
    """The maximum over ranks of a number."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean(x: torch.Tensor) -> float:
    """The mean of every rank's entries of `x` (x.mean() in one process)."""
    if not dist.is_initialized():
        return x.float().mean().item()
    total, count = all_sum([x.float().sum(), x.numel()])
    return total / count


def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's `tensors`, in rank order, on this rank's device (`tensors` in one process)."""
    if not dist.is_initialized():
        return tensors
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [t.cpu() for t in tensors])  # pickled CUDA tensors would come back on their rank's GPU
    return [t.to(_device()) for part in parts for t in part]
