"""What the kernel tests share: which backends to run, fresh random inputs, dtypes."""

import os

import pytest
import torch

# Triton on CPU tensors runs through the interpreter, which conftest enables only without
# CUDA; on a GPU machine the gpu-marked tests run the kernels on CUDA tensors instead.
TRITON_ON_CPU = pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))
BACKENDS = ["torch", TRITON_ON_CPU]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def fresh_generator(seed=None):
    """Freshly drawn inputs every run; the seed is printed so a failure can be replayed."""
    seed = torch.seed() % 2**31 if seed is None else seed
    print(f"input seed: {seed}")
    return torch.Generator().manual_seed(seed)
