"""Chosen-token log-probs (and entropy) from logits, reading the logits once.

The naive `log_softmax(logits.float()).gather(labels)` materialises a float32 copy of the
whole [N, V] logits, and its backward another one. Here one Triton program owns one row
and streams it in blocks with an online log-sum-exp (running max m, running sum
s = sum exp(z - m), running t = sum exp(z - m) (z - m) for the entropy), so the forward
writes three floats per row and nothing else. The backward re-reads the row once:

    z = logits / T,  lse = logsumexp(z),  p = softmax(z),  H = -sum p log p
    d logp_y / d logits = (onehot_y - p) / T
    d H / d logits      = -p (log p + H) / T

The PyTorch path does the same math on row chunks of TORCH_CHUNK_ELEMENTS elements, so CPU
training never holds more than a few float32 copies of one chunk.
Ignored positions (label == ignore_index) give 0 log-prob, 0 entropy and no gradient.
[B, T, V] logits are read through their strides, so a slice such as logits[:, :-1] is not
copied first.
"""

from __future__ import annotations

import torch

from rlhfkit.kernels.backend import HAS_TRITON, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

# Rows per PyTorch chunk = TORCH_CHUNK_ELEMENTS // V: 2^20 float32 = 4 MiB per temporary,
# small enough to stay in cache on CPU and far below a full [N, V] copy.
TORCH_CHUNK_ELEMENTS = 1 << 20
# Vocabulary block per loop step of a Triton program. The interpreter runs each block op
# as one numpy call, so it prefers big blocks; a GPU wants a block that fits registers.
MAX_BLOCK_V = {"cuda": 4096, "interpreter": 16384}


def block_v(n_cols: int, device: torch.device) -> int:
    limit = MAX_BLOCK_V["cuda" if device.type == "cuda" else "interpreter"]
    return min(triton.next_power_of_2(n_cols), limit)


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


if HAS_TRITON:

    @triton.jit
    def _logprobs_fwd_kernel(
        logits_ptr, seq_len, stride_batch, stride_seq, labels_ptr, logp_ptr, lse_ptr, entropy_ptr,
        n_cols, inv_temperature, ignore_index,
        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        # Row r of [B, T, V] logits with any batch / sequence strides (e.g. logits[:, :-1]).
        row_ptr = logits_ptr + (row // seq_len) * stride_batch + (row % seq_len) * stride_seq
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        n_read = tl.where(keep, n_cols, 0)  # an ignored row reads nothing: no memory traffic
        m = float("-inf")  # running max of z
        s = 0.0  # sum exp(z - m)
        t = 0.0  # sum exp(z - m) * (z - m), kept relative to m so H = log s - t/s has no cancellation
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf"))
            z = z.to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.max(z, 0))
            # While everything so far is -inf (masked vocabulary), shift by 0, not by -inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.exp(m - m_safe)
            e = tl.exp(z - m_safe)
            if WITH_ENTROPY:
                t = tl.where(s > 0, scale * (t + s * (m - m_safe)), 0.0)
                t += tl.sum(tl.where(z > float("-inf"), e * (z - m_safe), 0.0), 0)
            s = s * scale + tl.sum(e, 0)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.where(s > 0, s, 1.0)  # only an ignored row has s == 0; its outputs are zeroed below
        lse = m_safe + tl.log(s)
        safe_label = tl.where(keep, label, 0).to(tl.int64)
        z_label = tl.load(row_ptr + safe_label, mask=keep, other=0.0).to(tl.float32) * inv_temperature
        tl.store(logp_ptr + row, tl.where(keep, z_label - lse, 0.0))
        tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(keep, tl.log(s) - t / s, 0.0))

    @triton.jit
    def _logprobs_bwd_kernel(
        logits_ptr, seq_len, stride_batch, stride_seq, grad_ptr, grad_row_stride, labels_ptr, lse_ptr, entropy_ptr,
        grad_logp_ptr, grad_entropy_ptr, n_cols, inv_temperature, ignore_index,
        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # grad_ptr may alias logits_ptr (the fused-linear path overwrites its logits chunk):
        # each element is read before it is written, by the same program.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // seq_len) * stride_batch + (row % seq_len) * stride_seq
        grad_row_ptr = grad_ptr + row * grad_row_stride
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        n_read = tl.where(keep, n_cols, 0)  # an ignored row reads nothing and writes zeros
        lse = tl.load(lse_ptr + row)
        g_logp = tl.where(keep, tl.load(grad_logp_ptr + row), 0.0)
        if WITH_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
            g_entropy = tl.where(keep, tl.load(grad_entropy_ptr + row), 0.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf"))
            z = z.to(tl.float32) * inv_temperature
            p = tl.exp(z - lse)
            grad = tl.where(cols == label, g_logp, 0.0) - g_logp * p
            if WITH_ENTROPY:
                # p (log p + H) is 0 * -inf = nan on masked entries; their true value is 0.
                grad -= g_entropy * tl.where(z > float("-inf"), p * (z - lse + entropy), 0.0)
            grad = grad * inv_temperature
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _triton_forward(logits, labels, temperature, ignore_index, with_entropy):
    batch, seq_len, n_cols = logits.shape
    logp = torch.empty(batch * seq_len, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
    if logp.numel() == 0:
        return logp, lse, entropy
    block = block_v(n_cols, logits.device)
    _logprobs_fwd_kernel[(logp.numel(),)](
        logits, seq_len, logits.stride(0), logits.stride(1), labels, logp, lse, entropy,
        n_cols, 1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=num_warps_for(block),
    )
    return logp, lse, entropy


def _triton_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                     with_entropy, out):
    batch, seq_len, n_cols = logits.shape
    if out.shape[0] == 0:
        return out
    block = block_v(n_cols, logits.device)
    _logprobs_bwd_kernel[(out.shape[0],)](
        logits, seq_len, logits.stride(0), logits.stride(1), out, out.stride(0), labels, lse, entropy,
        grad_logp.contiguous(), grad_entropy.contiguous(), n_cols, 1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=num_warps_for(block),
    )
    return out


def _row_chunks(labels: torch.Tensor, ignore_index: int, n_cols: int):
    """Row chunks for the PyTorch path: slices, or kept row indices, of at most
    TORCH_CHUNK_ELEMENTS elements; ignored rows are skipped (they are often half of SFT)."""
    step = max(1, TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    keep = labels != ignore_index
    if bool(keep.all()):
        for start in range(0, labels.shape[0], step):
            yield slice(start, start + step)
    else:
        kept = keep.nonzero().squeeze(1)
        for start in range(0, kept.shape[0], step):
            yield kept[start:start + step]


def _float32_rows(logits, rows, inv_temperature):
    """z = logits[rows] / T in float32; a view (no copy) for float32 logits at T = 1."""
    z = logits[rows].float()
    return z * inv_temperature if inv_temperature != 1.0 else z


# CPU log_softmax sums exp() in float32 lane by lane, V/16 additions each: at V = 262,144
# (Gemma 3) its log-prob errors reach 1e-4 nats (2e-5 relative), past float32 rounding. Above
# this many columns the sum is accumulated in float64 instead (exact to float32 rounding; the
# op costs ~2x the fused pass, which keeps its speed below it: 5e-6 nats at V = 32,000).
FUSED_LOG_SOFTMAX_MAX_V = 65536


def _logp_entropy(z, labels, with_entropy):
    """Chosen-token log-prob and entropy of float32 rows z [N, V] (labels all kept)."""
    if z.shape[1] <= FUSED_LOG_SOFTMAX_MAX_V:
        logp_all = torch.log_softmax(z, dim=-1)
        logp = logp_all.gather(1, labels.unsqueeze(1)).squeeze(1)
        # entr(p) = -p log p, and entr(0) = 0 on masked vocabulary
        return logp, torch.special.entr(logp_all.exp_()).sum(-1) if with_entropy else None
    m = z.amax(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).min)  # a fully masked row stays finite
    e = (z - m).exp_()
    total = e.sum(-1, dtype=torch.float64)
    lse = m.squeeze(1).double() + total.log()
    logp = (z.gather(1, labels.unsqueeze(1)).squeeze(1).double() - lse).float()
    if not with_entropy:
        return logp, None
    # H = lse - sum(p z), over the finite entries (p = 0 where z = -inf)
    pz = torch.where(e > 0, e * z, torch.zeros_like(e)).sum(-1, dtype=torch.float64) / total
    return logp, (lse - pz).float()


def _torch_forward_2d(logits, labels, temperature, ignore_index, with_entropy):
    # Few, large ops per chunk: on a busy CPU every parallel region can wait for a thread.
    # log_softmax is one fused pass on CPU (logsumexp is several); the PyTorch backward
    # recomputes softmax and needs no saved lse, so none is returned (zeros).
    n_rows, n_cols = logits.shape
    if n_rows * n_cols <= TORCH_CHUNK_ELEMENTS:  # one chunk, e.g. a decode step: no bookkeeping
        keep = labels != ignore_index
        logp, entropy = _logp_entropy(_float32_rows(logits, slice(None), 1.0 / temperature),
                                      torch.where(keep, labels, 0), with_entropy)
        entropy = entropy.masked_fill_(~keep, 0.0) if with_entropy else torch.zeros_like(logp)
        return logp.masked_fill_(~keep, 0.0), torch.zeros_like(logp), entropy
    logp = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.zeros_like(logp)
    for rows in _row_chunks(labels, ignore_index, n_cols):
        chunk_logp, chunk_entropy = _logp_entropy(_float32_rows(logits, rows, 1.0 / temperature), labels[rows],
                                                  with_entropy)
        logp[rows] = chunk_logp
        if with_entropy:
            entropy[rows] = chunk_entropy
    return logp, torch.zeros_like(logp), entropy


def _torch_backward_2d(logits, labels, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                       with_entropy, out):
    # d/dz [g_logp logp_y + g_H H] = g_logp onehot_y - p (g_logp + g_H H) + g_H entr(p),
    # using d H / d z = -p (log p + H) = entr(p) - p H; then / T for the logits.
    n_rows, n_cols = logits.shape
    inv_temperature = 1.0 / temperature
    # Kept rows are all written below; ignored rows are never read, so zeroing them first is
    # safe even when `out` is the logits tensor itself.
    grad = out
    grad[labels == ignore_index] = 0
    for rows in _row_chunks(labels, ignore_index, n_cols):
        z = _float32_rows(logits, rows, inv_temperature)
        g_logp = grad_logp[rows].unsqueeze(1) * inv_temperature
        p = torch.softmax(z, dim=-1)
        if with_entropy:
            g_entropy = grad_entropy[rows].unsqueeze(1) * inv_temperature
            g = torch.special.entr(p).mul_(g_entropy)
            g.addcmul_(p, g_logp + g_entropy * entropy[rows].unsqueeze(1), value=-1.0)
        else:
            g = p.mul_(-g_logp)
        g.scatter_add_(1, labels[rows].unsqueeze(1), g_logp)
        grad[rows] = g.to(grad.dtype)
    return grad


def _torch_forward(logits, labels, temperature, ignore_index, with_entropy):
    # One [T, V] view per batch index: no copy of sliced logits such as logits[:, :-1].
    seq_len = logits.shape[1]
    if logits.shape[0] == 1:
        return _torch_forward_2d(logits[0], labels, temperature, ignore_index, with_entropy)
    outputs = [torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device) for _ in range(3)]
    for b in range(logits.shape[0]):
        rows = slice(b * seq_len, (b + 1) * seq_len)
        for output, value in zip(outputs, _torch_forward_2d(logits[b], labels[rows], temperature,
                                                             ignore_index, with_entropy)):
            output[rows] = value
    return tuple(outputs)


def _torch_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                    with_entropy, out):
    seq_len = logits.shape[1]
    for b in range(logits.shape[0]):
        rows = slice(b * seq_len, (b + 1) * seq_len)
        _torch_backward_2d(logits[b], labels[rows], entropy[rows], grad_logp[rows], grad_entropy[rows],
                           temperature, ignore_index, with_entropy, out[rows])
    return out


def as_3d(logits):
    """[B, T, V] view (copy only if the leading dims cannot merge) with unit last stride."""
    if logits.dim() <= 2:
        logits = logits.reshape(1, -1, logits.shape[-1])
    elif logits.dim() > 3:
        logits = logits.flatten(0, -3)
    return logits if logits.stride(-1) == 1 or logits.numel() == 0 else logits.contiguous()


def rows_forward(logits, labels, temperature, ignore_index, with_entropy, backend):
    """(logp, lse, entropy) per row of 2-D [N, V] or 3-D [B, T, V] logits with unit last stride;
    labels flat [N] / [B * T]."""
    impl = _triton_forward if backend == "triton" else _torch_forward
    return impl(as_3d(logits), labels, float(temperature), int(ignore_index), bool(with_entropy))


def rows_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                  with_entropy, backend, out=None):
    """Gradient w.r.t. the logits as a contiguous [N, V] tensor in their dtype; `out` (2-D,
    contiguous) may be the 2-D logits themselves."""
    logits = as_3d(logits)
    if out is None:
        out = torch.empty(labels.shape[0], logits.shape[-1], dtype=logits.dtype, device=logits.device)
    impl = _triton_backward if backend == "triton" else _torch_backward
    return impl(logits, labels, lse, entropy, grad_logp, grad_entropy, float(temperature),
                int(ignore_index), bool(with_entropy), out)


class LogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy, backend):
        logp, lse, entropy = rows_forward(logits, labels, temperature, ignore_index, with_entropy, backend)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, with_entropy, backend)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, backend = ctx.args
        grad = rows_backward(logits, labels, lse, entropy, grad_logp.float(), grad_entropy.float(),
                             temperature, ignore_index, with_entropy, backend)
        return grad.view(logits.shape), None, None, None, None, None


def _check(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must be logits {tuple(logits.shape)} without the last dim")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / temperature)[label] per position, float32, shaped like labels.

    With return_entropy=True also the entropy of softmax(logits / temperature) per position,
    as a tuple (logprobs, entropy). Positions whose label is ignore_index give 0 for both and
    no gradient. Differentiable w.r.t. logits; the gradient comes back in the logits' dtype.
    """
    _check(logits, labels, temperature)
    lead_shape = labels.shape
    logits3d = as_3d(logits)  # a view for the usual [B, T, V] and [N, V], sliced or not
    labels1d = labels.reshape(-1).to(device=logits.device, dtype=torch.int64).contiguous()
    backend = resolve_backend(logits)
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, entropy = LogProbsFunction.apply(logits3d, labels1d, temperature, ignore_index, return_entropy, backend)
    else:  # the server's decode step: no autograd bookkeeping
        logp, _, entropy = rows_forward(logits3d, labels1d, temperature, ignore_index, return_entropy, backend)
    logp = logp.reshape(lead_shape)
    return (logp, entropy.reshape(lead_shape)) if return_entropy else logp
