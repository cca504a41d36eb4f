"""kl_from_logprobs and full_kl_from_logits against float64 references written here."""

import pytest
import torch

from rlhfkit.kernels import full_kl_from_logits, kl_from_logprobs, use_backend
from rlhfkit.kernels import kl as kl_module
from rlhfkit.kernels import logprobs as logprobs_module
from kernel_testing import BACKENDS, DTYPES, fresh_generator

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(kl_module, "TORCH_CHUNK_ELEMENTS", 4096)
    monkeypatch.setitem(logprobs_module.MAX_BLOCK_V, "interpreter", 2048)


def reference_full_kl(logits, ref_logits, temperature):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    logq = torch.log_softmax(ref_logits.double() / temperature, -1)
    # Masked entries (-inf in both) contribute 0; zero their log-probs first so that the
    # reference's own gradient is not 0 * nan there.
    masked = torch.isinf(logp)
    logp_finite = logp.masked_fill(masked, 0.0)
    logq_finite = logq.masked_fill(masked, 0.0)
    return (logp.exp() * (logp_finite - logq_finite)).sum(-1)


def check(actual, expected, rtol, atol=1e-7):
    scale = expected.abs().max().item()
    assert scale > 0, "vacuous comparison"
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale + atol)


def grad_tolerance(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_sampled_token_estimators(estimator):
    logp = -torch.rand(5, 7, dtype=torch.float64) * 4
    ref = -torch.rand(5, 7, dtype=torch.float64) * 4
    r = ref - logp  # written out independently of the module's algebra
    expected = {"k1": logp - ref, "k2": 0.5 * (logp - ref) ** 2, "k3": torch.exp(r) - 1 - r}[estimator]
    x, y = logp.float().requires_grad_(), ref.float().requires_grad_()
    out = kl_from_logprobs(x, y, estimator)
    assert out.dtype == torch.float32
    check(out, expected, 1e-5)
    x64, y64 = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    r64 = y64 - x64
    {"k1": x64 - y64, "k2": 0.5 * (x64 - y64) ** 2, "k3": torch.exp(r64) - 1 - r64}[estimator].sum().backward()
    out.sum().backward()
    check(x.grad, x64.grad, 1e-5)
    check(y.grad, y64.grad, 1e-5)


def test_k3_precise_near_zero():
    # exp(r) - 1 - r in float32 would cancel to 0 or 1e-7 garbage at r ~ 1e-4; the answer is ~r^2/2.
    logp = torch.tensor([-2.0, -3.0])
    ref = logp + 1e-4
    r = ref.double() - logp.double()
    out = kl_from_logprobs(logp, ref, "k3")
    torch.testing.assert_close(out.double(), torch.expm1(r) - r, rtol=1e-5, atol=0)


def test_bad_estimator_names_the_allowed_values():
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_from_logprobs(torch.zeros(2), torch.zeros(2), "k4")


def draw_pair(shape, vocab, dtype, masked, close, gen):
    logits = torch.randn(*shape, vocab, generator=gen) * 3
    noise = torch.randn(*shape, vocab, generator=gen) * (0.05 if close else 3)
    ref_logits = logits + noise + 1.7  # + a shift: KL ignores it, a wrong lse would not
    if masked:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[::3] = True
        mask[:2500] = True
        logits[..., mask] = float("-inf")
        ref_logits[..., mask] = float("-inf")
        logits[..., 2501::7] = float("-inf")  # tokens only the policy masks: p = 0 there, q > 0
    return logits.to(dtype), ref_logits.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,vocab,temperature,masked,close,ref_grad",
    [
        ((3, 4), 1003, 1.0, False, False, True),
        ((5,), 5003, 0.7, True, True, False),
        ((2, 3), 4099, 1.4, True, False, True),
    ],
)
def test_full_kl_matches_float64_reference(backend, dtype, shape, vocab, temperature, masked, close, ref_grad):
    gen = fresh_generator()
    logits, ref_logits = draw_pair(shape, vocab, dtype, masked, close, gen)
    x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_(ref_grad)
    with use_backend(backend):
        kl = full_kl_from_logits(x, y, temperature)
    assert kl.dtype == torch.float32 and kl.shape == shape
    x64, y64 = logits.double().requires_grad_(), ref_logits.double().requires_grad_(ref_grad)
    expected = reference_full_kl(x64, y64, temperature)
    # KL = E_p[zp - zq] - (lse_p - lse_q): terms of the size of the log-sum-exps (~10-20 here)
    # whose float32 rounding sets the floor when p is close to q and KL is ~1e-3. The bound
    # scales with them: 4 float32 ulps of the largest log-sum-exp (under 1% of such a KL).
    lse = torch.maximum((logits.double() / temperature).logsumexp(-1).abs(),
                        (ref_logits.double() / temperature).logsumexp(-1).abs())
    atol = 4 * torch.finfo(torch.float32).eps * lse.max().item()
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-5, atol=atol)
    # The gradient p * (log p - log q - KL) / T carries that same rounding, times p / T.
    grad_atol = atol * torch.softmax(logits.double() / temperature, -1).max().item() / temperature
    assert expected.abs().max() > 1e-4
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    kl.backward(g.float())
    expected.backward(g)
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    check(x.grad, x64.grad, grad_tolerance(dtype), grad_atol)
    if ref_grad:
        assert y.grad.dtype == dtype
        check(y.grad, y64.grad, grad_tolerance(dtype), grad_atol)
    else:
        assert y.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_large_vocabulary(backend, monkeypatch):
    monkeypatch.setitem(logprobs_module.MAX_BLOCK_V, "interpreter", 16384)
    monkeypatch.setattr(kl_module, "TORCH_CHUNK_ELEMENTS", 1 << 20)
    gen = fresh_generator()
    logits, ref_logits = draw_pair((2,), 262144, torch.bfloat16, True, False, gen)
    x = logits.clone().requires_grad_()
    with use_backend(backend):
        kl = full_kl_from_logits(x, ref_logits, 0.9)
    x64 = logits.double().requires_grad_()
    expected = reference_full_kl(x64, ref_logits, 0.9)
    check(kl, expected.detach(), 1e-5)
    kl.sum().backward()
    expected.sum().backward()
    check(x.grad, x64.grad, grad_tolerance(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_of_identical_distributions_is_zero(backend):
    logits = torch.randn(3, 2001) * 4
    with use_backend(backend):
        kl = full_kl_from_logits(logits, logits + 3.0)
    assert kl.abs().max() < 1e-5


def test_full_kl_shape_mismatch():
    with pytest.raises(ValueError, match="must match"):
        full_kl_from_logits(torch.zeros(2, 5), torch.zeros(2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_of_sliced_batch_logits(backend):
    # logits[:, :-1] for both models, as a per-token KL penalty uses them: read through strides.
    gen = fresh_generator()
    logits, ref_logits = draw_pair((3, 6), 3001, torch.float32, True, False, gen)
    x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
    with use_backend(backend):
        kl = full_kl_from_logits(x[:, :-1], y[:, :-1], 0.8)
    assert kl.shape == (3, 5)
    x64, y64 = logits.double().requires_grad_(), ref_logits.double().requires_grad_()
    expected = reference_full_kl(x64[:, :-1], y64[:, :-1], 0.8)
    check(kl, expected.detach(), 1e-5)
    g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    kl.backward(g.float())
    expected.backward(g)
    check(x.grad, x64.grad, 2e-5)
    check(y.grad, y64.grad, 2e-5)
    assert torch.all(x.grad[:, -1] == 0) and torch.all(y.grad[:, -1] == 0)
