"""fused_linear_logprobs against a float64 reference (full logits, log_softmax) written here."""

import pytest
import torch

from rlhfkit.kernels import fused_linear_logprobs, use_backend
from rlhfkit.kernels import logprobs as logprobs_module
from kernel_testing import BACKENDS, IGNORE, fresh_generator

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(logprobs_module, "TORCH_CHUNK_ELEMENTS", 4096)
    monkeypatch.setitem(logprobs_module.MAX_BLOCK_V, "interpreter", 2048)


def reference(hidden, weight, labels, temperature):
    logits = hidden.double() @ weight.double().T
    logp_all = torch.log_softmax(logits / temperature, -1)
    keep = labels != IGNORE
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def check(actual, expected, rtol):
    scale = expected.abs().max().item()
    assert scale > 0, "vacuous comparison"
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale + 1e-7)


# Forward: float32 inputs give float32 rounding; bf16/fp16 logits are rounded once to the
# input dtype by the matmul (as the model's own LM head would), so the log-probs carry that.
FORWARD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}
# Gradients: low-precision logits, grad_logits rounded to the input dtype, then a matmul and
# grad_weight summed across chunks in it: a few ulps of the input dtype (measured: ~1.2e-2 of
# the largest entry for bf16, ~2.6e-3 for fp16).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2**-5, torch.float16: 2**-7}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,hidden_size,vocab,temperature,chunk_rows,n_ignored",
    [
        ((13,), 24, 1009, 1.0, 4, 3),
        ((2, 5), 40, 3001, 0.7, None, 2),
    ],
)
def test_matches_float64_reference(backend, dtype, shape, hidden_size, vocab, temperature, chunk_rows, n_ignored):
    gen = fresh_generator()
    hidden = torch.randn(*shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[torch.randperm(labels.numel(), generator=gen)[:n_ignored]] = IGNORE
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_backend(backend):
        logp, entropy = fused_linear_logprobs(h, w, labels, temperature, return_entropy=True, chunk_rows=chunk_rows)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == shape
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_entropy = reference(h64, w64, labels, temperature)
    check(logp, ref_logp.detach(), FORWARD_TOL[dtype])
    check(entropy, ref_entropy.detach(), FORWARD_TOL[dtype])
    g_logp, g_entropy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    torch.autograd.backward([logp, entropy], [g_logp.float(), g_entropy.float()])
    torch.autograd.backward([ref_logp, ref_entropy], [g_logp, g_entropy])
    assert h.grad.dtype == w.grad.dtype == dtype
    check(h.grad, h64.grad, GRAD_TOL[dtype])
    check(w.grad, w64.grad, GRAD_TOL[dtype])
    ignored = labels == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(h.grad[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_frozen_and_no_entropy(backend):
    gen = fresh_generator()
    hidden = torch.randn(9, 16, generator=gen)
    weight = torch.randn(517, 16, generator=gen) / 4
    labels = torch.randint(0, 517, (9,), generator=gen)
    h = hidden.clone().requires_grad_()
    with use_backend(backend):
        logp = fused_linear_logprobs(h, weight, labels, 1.5, chunk_rows=2)
    logp.sum().backward()
    h64 = hidden.double().requires_grad_()
    ref = reference(h64, weight, labels, 1.5)[0]
    ref.sum().backward()
    check(logp, ref.detach(), 1e-5)
    check(h.grad, h64.grad, 2e-5)


def test_default_chunk_keeps_logits_near_hidden_size():
    from rlhfkit.kernels.fused_linear import default_chunk_rows

    assert default_chunk_rows(8192, 4096, 128256) == 256  # 256 x 128256 logits ~ 8192 x 4096 hidden
    assert default_chunk_rows(65536, 4096, 128256) == 2048
    assert default_chunk_rows(4096, 256, 32000) == 256  # small hidden: no tiny chunks
    assert default_chunk_rows(3, 4096, 128256) == 3


def test_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(torch.zeros(3, 4), torch.zeros(10, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(33, 8, requires_grad=True)
    labels = torch.full((4,), IGNORE)
    with use_backend(backend):
        logp, entropy = fused_linear_logprobs(hidden, weight, labels, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
