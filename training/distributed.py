"""Data-parallel training under torchrun (nanoGPT-style), e.g.

    torchrun --nproc_per_node 2 -m rlhfkit.training.cli sft ...

torchrun starts one process per rank and sets RANK, WORLD_SIZE and LOCAL_RANK; a trainer
then joins the process group (gloo on CPU, NCCL on CUDA with cuda:LOCAL_RANK), takes its
slice of every global batch, and the ranks add up their gradients before each optimizer
step, so their weights stay identical. Rank 0 alone writes checkpoints, metrics and progress
bars. Without torchrun every function here is a no-op or the identity: one process trains
exactly as it always has.

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


def broadcast_parameters(*models: torch.nn.Module) -> None:
    """Give every rank rank 0's weights, as DistributedDataParallel does when it wraps a model
    (a freshly initialised head, e.g. the reward model's, then starts the same everywhere)."""
    if dist.is_initialized():
        for model in models:
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)


def sum_gradients(parameters) -> None:
    """Add up the ranks' gradients, in place, once per optimizer step after all micro-batches.

    Each rank's loss is its share of the global batch's loss (normalised by the global
    batch's example or token count), so the sum is the global batch's gradient, exactly as
    micro-batches add up in one process. This replaces DistributedDataParallel, whose reducer
    hooks into model.forward: the trainers read hidden states from model.base_model and
    apply the LM head (or score head) themselves, which DDP would not see.
    """
    if not dist.is_initialized():
        return
    params = [p for p in parameters if p.requires_grad]
    # A rank with no examples in this batch has no gradients: it adds zeros.
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)


def all_sum(values: list) -> list[float]:
    """The sum over ranks of each of `values` (numbers or one-element tensors), as floats."""
    values = [float(v) for v in values]
    if dist.is_initialized():
        summed = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(summed)
        values = summed.tolist()
    return values


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
