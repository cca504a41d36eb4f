"""Which implementation runs: the Triton kernels or the chunked PyTorch code.

"auto" picks Triton for CUDA tensors and PyTorch for everything else. "triton" forces the
kernels, which on CPU tensors only works through Triton's interpreter (TRITON_INTERPRET=1
set before triton is imported; tests/conftest.py does that). The choice lives in a
ContextVar, so one server thread forcing a backend never changes what another sees.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

try:  # triton is an optional extra: without it everything runs the PyTorch path
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("rlhfkit_kernels_backend", default="auto")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the kernels' implementation inside a `with` block: "triton", "torch" or "auto"."""
    token = _backend.set(_check_name(name))
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def resolve_backend(tensor: torch.Tensor) -> str:
    """The implementation that runs for `tensor` under the current setting: "triton" or "torch"."""
    name = _backend.get()
    if name == "auto":
        return "triton" if (tensor.is_cuda and HAS_TRITON) else "torch"
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("use_backend('triton') needs the triton package (pip install 'rlhfkit[triton]')")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
            )
    return name
