"""logprobs_from_logits against a float64 reference written here, on both backends.

The Triton backend runs on CPU tensors through the interpreter (conftest sets
TRITON_INTERPRET=1 without CUDA), so shapes are small. The reference is plain float64
log_softmax on the same (dtype-rounded) inputs, so forward errors are held to float32
rounding for every input dtype; gradients come back in the input dtype and are held to
that dtype's rounding.
"""

import pytest
import torch

from rlhfkit.kernels import logprobs as logprobs_module
from rlhfkit.kernels import logprobs_from_logits, use_backend
from kernel_testing import BACKENDS, DTYPES, IGNORE, fresh_generator

# The interpreter evaluates masked-out lanes too (0 * -inf on masked vocabulary), which numpy reports.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Several row chunks (PyTorch path) and several vocabulary blocks (Triton path) even at test sizes.
    monkeypatch.setattr(logprobs_module, "TORCH_CHUNK_ELEMENTS", 4096)
    monkeypatch.setitem(logprobs_module.MAX_BLOCK_V, "interpreter", 2048)


def reference(logits, labels, temperature, ignore_index=IGNORE):
    """float64 chosen-token log-prob and entropy, 0 where labels == ignore_index."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    keep = labels != ignore_index
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def draw(shape, vocab, dtype, masked=False, n_ignored=0, scale=3.0, seed=None):
    gen = fresh_generator(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    if masked:  # a masked vocabulary: every 5th token and the first 1500 are -inf, never a label
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[::5] = True
        mask[: min(1500, vocab // 2)] = True
        logits[..., mask] = float("-inf")
        allowed = (~mask).nonzero().squeeze(1)
        labels = allowed[torch.randint(0, allowed.numel(), shape, generator=gen)]
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE
    return logits, labels


def grad_tolerance(dtype):
    # bf16 keeps 8 significant bits, fp16 11: the gradient is rounded once to that precision.
    return {torch.float32: 2e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]


def check(actual, expected, rtol):
    scale = expected.abs().max().item()
    assert scale > 0, "vacuous comparison"
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale + 1e-7)


def run_case(backend, shape, vocab, dtype, temperature, masked, n_ignored, with_entropy=True):
    logits, labels = draw(shape, vocab, dtype, masked=masked, n_ignored=n_ignored)
    x = logits.clone().requires_grad_()
    with use_backend(backend):
        out = logprobs_from_logits(x, labels, temperature=temperature, return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape

    x64 = logits.double().requires_grad_()
    ref_logp, ref_entropy = reference(x64, labels, temperature)
    check(logp, ref_logp.detach(), 1e-5)
    if with_entropy:
        assert entropy.dtype == torch.float32 and entropy.shape == labels.shape
        check(entropy, ref_entropy.detach(), 1e-5)

    g_logp = torch.randn(labels.shape, dtype=torch.float64)
    g_entropy = torch.randn(labels.shape, dtype=torch.float64)
    outputs, ref_outputs, grads = [logp], [ref_logp], [g_logp.float()]
    if with_entropy:
        outputs, ref_outputs, grads = outputs + [entropy], ref_outputs + [ref_entropy], grads + [g_entropy.float()]
    torch.autograd.backward(outputs, grads)
    torch.autograd.backward(ref_outputs, [g_logp, g_entropy][: len(ref_outputs)])
    assert x.grad.dtype == dtype
    check(x.grad, x64.grad, grad_tolerance(dtype))
    ignored = labels == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(x.grad[ignored] == 0)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,vocab,temperature,masked,n_ignored",
    [
        ((3, 5), 1003, 1.0, False, 4),
        ((7,), 5003, 0.7, True, 2),
        ((2, 3), 4099, 1.3, True, 0),
    ],
)
def test_matches_float64_reference(backend, dtype, shape, vocab, temperature, masked, n_ignored):
    run_case(backend, shape, vocab, dtype, temperature, masked, n_ignored)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy(backend):
    run_case(backend, (5,), 2053, torch.float32, 0.9, True, 1, with_entropy=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary(backend, monkeypatch):
    monkeypatch.setitem(logprobs_module.MAX_BLOCK_V, "interpreter", 16384)
    monkeypatch.setattr(logprobs_module, "TORCH_CHUNK_ELEMENTS", 1 << 20)
    run_case(backend, (2,), 262144, torch.bfloat16, 0.8, True, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_without_grad(backend):
    # The server's call: [B, V] logits of one decode step, no autograd.
    logits, labels = draw((1,), 32003, torch.bfloat16)
    with use_backend(backend), torch.no_grad():
        logp = logprobs_from_logits(logits, labels, temperature=0.6)
    assert logp.shape == (1,) and logp.dtype == torch.float32
    check(logp, reference(logits, labels, 0.6)[0], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    logits, labels = draw((4,), 777, torch.float32)
    x = logits.clone().requires_grad_()
    with use_backend(backend):
        _, entropy = logprobs_from_logits(x, labels, return_entropy=True)
    entropy.sum().backward()
    x64 = logits.double().requires_grad_()
    reference(x64, labels, 1.0)[1].sum().backward()
    check(x.grad, x64.grad, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits_and_custom_ignore_index(backend):
    base, labels = draw((6,), 1501, torch.float32)
    logits = base.t().contiguous().t()  # same values, column-major
    labels[1] = 7
    labels[0] = 7
    x = logits.clone().requires_grad_()
    with use_backend(backend):
        logp = logprobs_from_logits(x, labels, ignore_index=7)
    logp.sum().backward()
    x64 = logits.double().requires_grad_()
    ref = reference(x64, labels, 1.0, ignore_index=7)[0]
    ref.sum().backward()
    check(logp, ref.detach(), 1e-5)
    check(x.grad, x64.grad, 2e-5)
    assert torch.all(x.grad[:2] == 0)


def test_bad_inputs():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="'triton'"):
        with use_backend("cuda"):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_batch_logits_are_read_in_place(backend, monkeypatch):
    # logits[:, :-1] (drop the last position, as LM losses do) is not viewable as [N, V]; both
    # paths read it through its strides instead of copying it first.
    logits, labels = draw((3, 8), 1031, torch.bfloat16, masked=True, n_ignored=3)
    x = logits.clone().requires_grad_()
    sliced, sliced_labels = x[:, :-1], labels[:, :-1]
    shares_storage = []
    original_as_3d = logprobs_module.as_3d

    def recording_as_3d(t):
        out = original_as_3d(t)
        shares_storage.append(out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(logprobs_module, "as_3d", recording_as_3d)
    with use_backend(backend):
        logp, entropy = logprobs_from_logits(sliced, sliced_labels, temperature=0.8, return_entropy=True)
    assert shares_storage and all(shares_storage), "the sliced logits were copied"
    g1, g2 = torch.randn(logp.shape), torch.randn(logp.shape)
    torch.autograd.backward([logp, entropy], [g1, g2])
    x64 = logits.double().requires_grad_()
    ref_logp, ref_entropy = reference(x64[:, :-1], sliced_labels, 0.8)
    torch.autograd.backward([ref_logp, ref_entropy], [g1.double(), g2.double()])
    check(logp, ref_logp.detach(), 1e-5)
    check(entropy, ref_entropy.detach(), 1e-5)
    check(x.grad, x64.grad, grad_tolerance(torch.bfloat16))
    assert torch.all(x.grad[:, -1] == 0)
