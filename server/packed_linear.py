"""Faster float32 linear layers for CPU serving.

On CPU, PyTorch's float32 `F.linear` goes to MKL, whose GEMM for the skinny shapes of a
decode step (8-64 rows) runs far below memory bandwidth. oneDNN's GEMM on a weight kept in
its own blocked layout is ~1.3x faster at 8 rows and ~2x at 64 (measured on the project's
2-core machine; bench/serve.py shows the end-to-end effect). For a handful of rows MKL is
faster, so both layouts are kept and the row count picks one: the price is a second copy of
the linear weights in memory. Inference only: with autograd on, the plain layer runs.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_ROWS = 8  # below this, MKL on the plain weight wins


class PackedLinear(nn.Linear):
    """An nn.Linear that also holds its weight in oneDNN's layout (shares the plain one)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed_weight = linear.weight.detach().to_mkldnn()
        self.packed_bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < MIN_ROWS or torch.is_grad_enabled() or x.dtype != torch.float32:
            return super().forward(x)
        y = torch._C._nn.mkldnn_linear(x.reshape(rows, self.in_features).to_mkldnn(), self.packed_weight,
                                       self.packed_bias)
        return y.to_dense().view(*x.shape[:-1], self.out_features)


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every float32 CPU nn.Linear of `model` for a PackedLinear, in place. Returns how
    many were swapped (0 where oneDNN is unavailable or the model is not float32 on CPU)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.float32):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped
