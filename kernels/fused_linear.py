"""Chosen-token log-probs (and entropy) straight from hidden states and the LM-head weight.

`logits = hidden @ weight.T` is the largest tensor in LM training ([N, V], V up to 256k).
As in Liger-Kernel's fused linear cross-entropy, rows go through in chunks: each chunk's
logits are made, reduced to log-probs by the row kernels of logprobs.py, and dropped, so
only one [chunk, V] block exists at a time. Unlike a scalar loss, per-token outputs get a
per-token incoming gradient that is unknown during the forward, so the backward makes each
chunk's logits again (one extra matmul), turns them into their gradient in place, and
multiplies out: grad_hidden = grad_logits @ weight, grad_weight += grad_logits.T @ hidden.
Ignored rows (label == ignore_index) are dropped before the matmul.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.kernels.backend import resolve_backend
from rlhfkit.kernels.logprobs import rows_backward, rows_forward


# Each chunk reads the whole weight (and the backward adds into its gradient), V x H values
# for 2 x rows x V x H flops: below a few hundred rows that traffic, not the matmul, is the cost.
MIN_CHUNK_ROWS = 256


def default_chunk_rows(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    # Liger's rule (a chunk's logits about as big as all the hidden states), but at least
    # MIN_CHUNK_ROWS rows: small models (H << V) would otherwise get chunks of a few rows.
    per_chunk = math.ceil(n_rows / math.ceil(vocab_size / max(hidden_size, 1)))
    liger = 1 << max(per_chunk - 1, 0).bit_length()
    return max(1, min(n_rows, max(liger, MIN_CHUNK_ROWS)))


class FusedLinearLogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, with_entropy, chunk_rows, backend):
        logp = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
        lse, entropy = torch.zeros_like(logp), torch.zeros_like(logp)
        kept = (labels != ignore_index).nonzero().squeeze(1)
        for start in range(0, kept.shape[0], chunk_rows):
            rows = kept[start:start + chunk_rows]
            logits = hidden[rows] @ weight.T
            logp[rows], lse[rows], entropy[rows] = rows_forward(
                logits, labels[rows], temperature, ignore_index, with_entropy, backend
            )
            del logits  # else the next chunk's logits are made while these still exist
        ctx.save_for_backward(hidden, weight, labels, kept, lse, entropy)
        ctx.args = (temperature, ignore_index, with_entropy, chunk_rows, backend)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, kept, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, chunk_rows, backend = ctx.args
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        # Accumulated in the weight's dtype across chunks, as Liger does (a float32 buffer
        # would add V x H x 4 bytes, the size this function exists to avoid).
        grad_weight = None
        grad_logp, grad_entropy = grad_logp.float(), grad_entropy.float()
        for start in range(0, kept.shape[0], chunk_rows):
            rows = kept[start:start + chunk_rows]
            hidden_rows = hidden[rows]
            logits = hidden_rows @ weight.T
            grad_logits = rows_backward(
                logits, labels[rows], lse[rows], entropy[rows], grad_logp[rows], grad_entropy[rows],
                temperature, ignore_index, with_entropy, backend, out=logits,
            )
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if want_weight and grad_weight is None:  # the first chunk: no zeros to add into
                grad_weight = grad_logits.T @ hidden_rows
            elif want_weight:
                grad_weight.addmm_(grad_logits.T, hidden_rows)
            del logits, grad_logits  # one chunk's logits at a time, as in the forward
        if want_weight and grad_weight is None:  # every row ignored
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    *,
    chunk_rows: int | None = None,
):
    """logprobs_from_logits(hidden @ weight.T, labels, ...) without making the [N, V] logits.

    hidden [..., H], weight [V, H] (the LM head), labels [...]. Returns float32 log-probs shaped
    like labels (and the entropy, as a tuple, with return_entropy=True). Differentiable w.r.t.
    hidden and weight; gradients in their dtypes. chunk_rows overrides the rows per chunk.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must be hidden {tuple(hidden.shape)} without the last dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, {hidden.shape[-1]}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    rows = chunk_rows or default_chunk_rows(hidden2d.shape[0], weight.shape[1], weight.shape[0])
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast reaches the forward's matmuls but not the backward, which would recompute
        # the logits in float32 against a log-sum-exp taken in the autocast dtype: cast the
        # inputs here and run both passes in that dtype (the casts carry the gradients back).
        dtype = torch.get_autocast_dtype(device_type)
        hidden2d, weight = hidden2d.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        logp, entropy = FusedLinearLogProbsFunction.apply(
            hidden2d, weight, labels1d, float(temperature), int(ignore_index), bool(return_entropy), int(rows),
            resolve_backend(hidden),
        )
    logp = logp.reshape(labels.shape)
    return (logp, entropy.reshape(labels.shape)) if return_entropy else logp
