"""KL divergence to a reference model: per sampled token from log-probs, or exact over the vocabulary.

Sampled-token estimators of KL(pi || ref), with r = ref_logp - logp (Schulman, "Approximating
KL divergence", 2020): k1 = -r (unbiased, high variance, can be negative), k2 = r^2 / 2
(biased, low variance), k3 = exp(r) - 1 - r (unbiased, low variance, >= 0).

The exact KL(p || q) = sum_v p_v (log p_v - log q_v) reads both logits tensors once. With
d = zp - zq (z = logits / T) it is E_p[d] - (lse_p - lse_q); one Triton program per row keeps
online log-sum-exps of zp and zq and a running E_p[d], all three rescaled as maxima grow.
Tracking d itself (rather than E_p[zp] and E_p[zq]) keeps precision when p is close to q, the
usual case in RLHF. Gradients, per row with incoming g:
    d KL / d zp_v = p_v (d_v - E_p[d]),    d KL / d zq_v = q_v - p_v.
"""

from __future__ import annotations

import torch

from rlhfkit.kernels.backend import HAS_TRITON, resolve_backend
from rlhfkit.kernels.logprobs import as_3d, block_v, num_warps_for

if HAS_TRITON:
    import triton
    import triton.language as tl

KL_ESTIMATORS = ("k1", "k2", "k3")
# Rows per PyTorch chunk = TORCH_CHUNK_ELEMENTS // V (four float32 temporaries of this size).
TORCH_CHUNK_ELEMENTS = 1 << 20


def kl_from_logprobs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs: "k1", "k2" or "k3".

    Differentiable w.r.t. both inputs; computed in float32 (or float64 if given float64).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, KL_ESTIMATORS))}; got {estimator!r}")
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype), torch.float32)
    log_ratio = ref_logprobs.to(dtype) - logprobs.to(dtype)  # log ref/pi at the sampled token
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # exp(r) - 1 - r ~ r^2/2 cancels badly in float32 when pi is close to ref (r ~ 1e-4 keeps
    # ~10 bits): expm1 in float64 on these per-token scalars costs nothing and keeps them all.
    wide = log_ratio.double()
    return (torch.expm1(wide) - wide).to(dtype)


if HAS_TRITON:

    @triton.jit
    def _full_kl_fwd_kernel(
        p_ptr, p_stride_batch, p_stride_seq, q_ptr, q_stride_batch, q_stride_seq, seq_len,
        kl_ptr, lse_p_ptr, lse_q_ptr, mean_d_ptr, n_cols, inv_temperature, BLOCK_V: tl.constexpr,
    ):
        # Maxima and differences are taken on the raw logits and scaled by 1/T afterwards:
        # x - m and xp - xq are (near) exact in float32, so a small KL keeps its precision.
        row = tl.program_id(0).to(tl.int64)
        # Row r of [B, T, V] logits with any batch / sequence strides (e.g. logits[:, :-1]).
        p_row_ptr = p_ptr + (row // seq_len) * p_stride_batch + (row % seq_len) * p_stride_seq
        q_row_ptr = q_ptr + (row // seq_len) * q_stride_batch + (row % seq_len) * q_stride_seq
        m_p = float("-inf")  # running max of the raw logits
        s_p = 0.0  # sum exp((xp - m_p) / T)
        sum_d = 0.0  # sum exp((xp - m_p) / T) * (xp - xq)
        m_q = float("-inf")
        s_q = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            xp = tl.load(p_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            xq = tl.load(q_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            # -inf maxima (masked vocabulary so far) shift by 0 instead of -inf.
            m_p_new = tl.maximum(m_p, tl.max(xp, 0))
            m_p_safe = tl.where(m_p_new == float("-inf"), 0.0, m_p_new)
            scale_p = tl.exp((m_p - m_p_safe) * inv_temperature)
            e_p = tl.exp((xp - m_p_safe) * inv_temperature)
            s_p = s_p * scale_p + tl.sum(e_p, 0)
            sum_d = sum_d * scale_p + tl.sum(tl.where(xp > float("-inf"), e_p * (xp - xq), 0.0), 0)
            m_p = m_p_new
            m_q_new = tl.maximum(m_q, tl.max(xq, 0))
            m_q_safe = tl.where(m_q_new == float("-inf"), 0.0, m_q_new)
            s_q = s_q * tl.exp((m_q - m_q_safe) * inv_temperature)
            s_q += tl.sum(tl.exp((xq - m_q_safe) * inv_temperature), 0)
            m_q = m_q_new
        mean_d = sum_d / s_p * inv_temperature  # E_p[zp - zq]
        # lse_p - lse_q as (m_p - m_q) / T + log(s_p / s_q): no rounding of two large logs.
        kl = mean_d - (m_p - m_q) * inv_temperature - tl.log(s_p / s_q)
        tl.store(kl_ptr + row, kl)
        tl.store(lse_p_ptr + row, m_p * inv_temperature + tl.log(s_p))
        tl.store(lse_q_ptr + row, m_q * inv_temperature + tl.log(s_q))
        tl.store(mean_d_ptr + row, mean_d)

    @triton.jit
    def _full_kl_bwd_kernel(
        p_ptr, p_stride_batch, p_stride_seq, q_ptr, q_stride_batch, q_stride_seq, seq_len,
        grad_p_ptr, grad_q_ptr, lse_p_ptr, lse_q_ptr, mean_d_ptr, grad_kl_ptr, n_cols, inv_temperature,
        WITH_REF_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        p_row_ptr = p_ptr + (row // seq_len) * p_stride_batch + (row % seq_len) * p_stride_seq
        q_row_ptr = q_ptr + (row // seq_len) * q_stride_batch + (row % seq_len) * q_stride_seq
        lse_p = tl.load(lse_p_ptr + row)
        lse_q = tl.load(lse_q_ptr + row)
        mean_d = tl.load(mean_d_ptr + row)
        g = tl.load(grad_kl_ptr + row) * inv_temperature
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            zp = tl.load(p_row_ptr + cols, mask=in_row, other=float("-inf"))
            zq = tl.load(q_row_ptr + cols, mask=in_row, other=float("-inf"))
            zp = zp.to(tl.float32)
            zq = zq.to(tl.float32)
            p = tl.exp(zp * inv_temperature - lse_p)
            d = (zp - zq) * inv_temperature
            grad_p = tl.where(zp > float("-inf"), p * (d - mean_d), 0.0) * g
            tl.store(grad_p_ptr + row * n_cols + cols, grad_p.to(grad_p_ptr.dtype.element_ty), mask=in_row)
            if WITH_REF_GRAD:
                grad_q = (tl.exp(zq * inv_temperature - lse_q) - p) * g
                tl.store(grad_q_ptr + row * n_cols + cols, grad_q.to(grad_q_ptr.dtype.element_ty), mask=in_row)


def _strides(logits, ref_logits):
    return (logits, logits.stride(0), logits.stride(1), ref_logits, ref_logits.stride(0), ref_logits.stride(1),
            logits.shape[1])


def _triton_forward(logits, ref_logits, temperature):
    batch, seq_len, n_cols = logits.shape
    n_rows = batch * seq_len
    kl, lse_p, lse_q, mean_d = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(4))
    if n_rows:
        block = block_v(n_cols, logits.device)
        _full_kl_fwd_kernel[(n_rows,)](
            *_strides(logits, ref_logits), kl, lse_p, lse_q, mean_d,
            n_cols, 1.0 / temperature, BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return kl, (lse_p, lse_q, mean_d)


def _triton_backward(logits, ref_logits, stats, grad_kl, temperature, with_ref_grad):
    batch, seq_len, n_cols = logits.shape
    n_rows = batch * seq_len
    grad_p = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    grad_q = torch.empty((n_rows, n_cols), dtype=ref_logits.dtype, device=logits.device) if with_ref_grad else None
    if n_rows:
        block = block_v(n_cols, logits.device)
        _full_kl_bwd_kernel[(n_rows,)](
            *_strides(logits, ref_logits), grad_p, grad_q if with_ref_grad else grad_p, *stats,
            grad_kl.contiguous(), n_cols, 1.0 / temperature,
            WITH_REF_GRAD=with_ref_grad, BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return grad_p, grad_q


def _chunk_terms(logits, ref_logits, rows, inv_temperature, with_q):
    """float32 (d = zp - zq, p, q or None, lse_p, lse_q, lse_p - lse_q) for a chunk of rows.

    As in the kernel, maxima and differences are taken on the raw logits and scaled by 1/T
    afterwards, and lse_p - lse_q = (m_p - m_q) / T + log(s_p / s_q).
    """
    xp, xq = logits[rows].float(), ref_logits[rows].float()  # views for float32 inputs
    # Where the policy masks a token (xp = -inf, p = 0), d is -inf or nan (both masked); it must
    # weigh 0, not poison the sums. +inf (only the reference masks it) stays: KL is infinite.
    d = torch.sub(xp, xq).mul_(inv_temperature).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=0.0)
    m_p, m_q = xp.amax(-1, keepdim=True), xq.amax(-1, keepdim=True)
    p = torch.sub(xp, m_p).mul_(inv_temperature).exp_()  # unnormalised until divided by s_p
    e_q = torch.sub(xq, m_q).mul_(inv_temperature).exp_()
    s_p, s_q = p.sum(-1, keepdim=True), e_q.sum(-1, keepdim=True)
    p.div_(s_p)
    lse_p = (m_p * inv_temperature + s_p.log()).squeeze(1)
    lse_q = (m_q * inv_temperature + s_q.log()).squeeze(1)
    lse_diff = ((m_p - m_q) * inv_temperature + (s_p / s_q).log()).squeeze(1)
    return d, p, (e_q.div_(s_q) if with_q else None), lse_p, lse_q, lse_diff


def _torch_row_blocks(logits, step):
    """(batch index, row slice within it, flat row slice) over [B, T, V] in chunks of `step` rows."""
    batch, seq_len, _ = logits.shape
    for b in range(batch):
        for start in range(0, seq_len, step):
            stop = min(start + step, seq_len)
            yield b, slice(start, stop), slice(b * seq_len + start, b * seq_len + stop)


def _torch_forward(logits, ref_logits, temperature):
    batch, seq_len, n_cols = logits.shape
    kl, lse_p, lse_q, mean_d = (torch.empty(batch * seq_len, dtype=torch.float32, device=logits.device)
                                for _ in range(4))
    step = max(1, TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    for b, rows, flat in _torch_row_blocks(logits, step):
        d, p, _, lse_p[flat], lse_q[flat], lse_diff = _chunk_terms(logits[b], ref_logits[b], rows,
                                                                   1.0 / temperature, False)
        mean_d[flat] = torch.linalg.vecdot(p, d)
        kl[flat] = mean_d[flat] - lse_diff
    return kl, (lse_p, lse_q, mean_d)


def _torch_backward(logits, ref_logits, stats, grad_kl, temperature, with_ref_grad):
    batch, seq_len, n_cols = logits.shape
    mean_d = stats[2]
    grad_p = torch.empty((batch * seq_len, n_cols), dtype=logits.dtype, device=logits.device)
    grad_q = (torch.empty((batch * seq_len, n_cols), dtype=ref_logits.dtype, device=logits.device)
              if with_ref_grad else None)
    step = max(1, TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    for b, rows, flat in _torch_row_blocks(logits, step):
        d, p, q, *_ = _chunk_terms(logits[b], ref_logits[b], rows, 1.0 / temperature, with_ref_grad)
        g = (grad_kl[flat] / temperature).unsqueeze(1)
        if with_ref_grad:
            grad_q[flat] = q.sub_(p).mul_(g)
        grad_p[flat] = d.sub_(mean_d[flat].unsqueeze(1)).mul_(p).mul_(g)
    return grad_p, grad_q


class FullKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, backend):
        impl = _triton_forward if backend == "triton" else _torch_forward
        kl, stats = impl(logits, ref_logits, temperature)
        ctx.save_for_backward(logits, ref_logits, *stats)
        ctx.args = (temperature, backend)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, *stats = ctx.saved_tensors
        temperature, backend = ctx.args
        impl = _triton_backward if backend == "triton" else _torch_backward
        grad_p, grad_q = impl(logits, ref_logits, stats, grad_kl.float(), temperature, ctx.needs_input_grad[1])
        return grad_p.view(logits.shape), None if grad_q is None else grad_q.view(ref_logits.shape), None, None


def full_kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(softmax(logits/T) || softmax(ref_logits/T)) per position, float32, shape logits.shape[:-1].

    Differentiable w.r.t. logits and (when it requires grad) ref_logits; gradients come back
    in each input's dtype.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must match")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(logits)
    # [B, T, V] views, sliced or not (e.g. logits[:, :-1]): read through their strides, not copied.
    kl = FullKLFunction.apply(as_3d(logits), as_3d(ref_logits), float(temperature), backend)
    return kl.reshape(logits.shape[:-1])
