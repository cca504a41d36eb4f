"""The Triton kernels as they run on a GPU.

test_kernels_compile_for_cuda needs no GPU: it compiles every kernel to a cubin for sm_80
and sm_90 (Triton's NVIDIA backend and ptxas run on any machine), which catches what the
interpreter lets through (types that differ between branches, unsupported ops). The tests
marked gpu run the Triton path on CUDA tensors against float64 references; conftest skips
them without CUDA.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlhfkit.kernels import full_kl_from_logits, fused_linear_logprobs, logprobs_from_logits, use_backend

COMPILE_SCRIPT = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rlhfkit.kernels import kl, logprobs

    def compile_kernel(fn, signature, constexprs, arch, num_warps):
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert "cubin" in kernel.asm

    for arch, dtype, flag in itertools.product((80, 90), ("bf16", "fp32"), (False, True)):
        compile_kernel(
            logprobs._logprobs_fwd_kernel,
            {"logits_ptr": "*" + dtype, "seq_len": "i32", "stride_batch": "i64", "stride_seq": "i32",
             "labels_ptr": "*i64", "logp_ptr": "*fp32",
             "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "n_cols": "i32", "inv_temperature": "fp32",
             "ignore_index": "i32"},
            {"WITH_ENTROPY": flag, "BLOCK_V": 4096}, arch, 8)
        compile_kernel(
            logprobs._logprobs_bwd_kernel,
            {"logits_ptr": "*" + dtype, "seq_len": "i32", "stride_batch": "i32", "stride_seq": "i32",
             "grad_ptr": "*" + dtype,
             "grad_row_stride": "i32", "labels_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
             "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "n_cols": "i32",
             "inv_temperature": "fp32", "ignore_index": "i32"},
            {"WITH_ENTROPY": flag, "BLOCK_V": 4096}, arch, 8)
        compile_kernel(
            kl._full_kl_fwd_kernel,
            {"p_ptr": "*" + dtype, "p_stride_batch": "i64", "p_stride_seq": "i32", "q_ptr": "*fp32",
             "q_stride_batch": "i64", "q_stride_seq": "i32", "seq_len": "i32", "kl_ptr": "*fp32", "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32", "mean_d_ptr": "*fp32",
             "n_cols": "i32", "inv_temperature": "fp32"},
            {"BLOCK_V": 4096}, arch, 8)
        compile_kernel(
            kl._full_kl_bwd_kernel,
            {"p_ptr": "*" + dtype, "p_stride_batch": "i32", "p_stride_seq": "i32", "q_ptr": "*" + dtype,
             "q_stride_batch": "i32", "q_stride_seq": "i32", "seq_len": "i32", "grad_p_ptr": "*" + dtype, "grad_q_ptr": "*" + dtype, "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32",
             "mean_d_ptr": "*fp32", "grad_kl_ptr": "*fp32", "n_cols": "i32", "inv_temperature": "fp32"},
            {"WITH_REF_GRAD": flag, "BLOCK_V": 4096}, arch, 8)
    print("compiled")
    """
)


def test_kernels_compile_for_cuda():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def reference_logprobs(logits, labels, temperature):
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    return logp, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)


def check(actual, expected, rtol):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale + 1e-7)


GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2**-8}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,vocab", [(257, 32000), (8, 262144), (3, 50257)])
def test_logprobs_on_cuda(dtype, n_rows, vocab):
    logits = (torch.randn(n_rows, vocab, device="cuda") * 3).to(dtype)
    logits[:, :777] = float("-inf")
    labels = torch.randint(777, vocab, (n_rows,), device="cuda")
    x = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(x, labels, temperature=0.8, return_entropy=True)  # auto: Triton on CUDA
    x64 = logits.double().requires_grad_()
    ref_logp, ref_entropy = reference_logprobs(x64, labels, 0.8)
    check(logp, ref_logp.detach(), 1e-5)
    check(entropy, ref_entropy.detach(), 1e-5)
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_logp)
    torch.autograd.backward([logp, entropy], [g1.float(), g2.float()])
    torch.autograd.backward([ref_logp, ref_entropy], [g1, g2])
    check(x.grad, x64.grad, GRAD_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_kl_on_cuda(dtype):
    logits = torch.randn(129, 32003, device="cuda") * 3
    ref_logits = logits + torch.randn_like(logits) * 0.5
    logits, ref_logits = logits.to(dtype), ref_logits.to(dtype)
    x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
    with use_backend("triton"):
        kl = full_kl_from_logits(x, y, 1.2)
    x64, y64 = logits.double().requires_grad_(), ref_logits.double().requires_grad_()
    logp, logq = torch.log_softmax(x64 / 1.2, -1), torch.log_softmax(y64 / 1.2, -1)
    expected = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-5, atol=2e-6)
    g = torch.randn_like(expected)
    kl.backward(g.float())
    expected.backward(g)
    check(x.grad, x64.grad, GRAD_TOL[dtype])
    check(y.grad, y64.grad, GRAD_TOL[dtype])


@pytest.mark.gpu
def test_fused_linear_on_cuda():
    hidden = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(32000, 256, device="cuda") / 8).to(torch.bfloat16)
    labels = torch.randint(0, 32000, (300,), device="cuda")
    labels[::7] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fused_linear_logprobs(h, w, labels, 0.9)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_all = torch.log_softmax(h64 @ w64.T / 0.9, -1)
    ref = torch.where(labels != -100, logp_all.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    check(logp, ref.detach(), 2**-7)
    g = torch.randn_like(ref)
    logp.backward(g.float())
    ref.backward(g)
    check(h.grad, h64.grad, 2**-5)
    check(w.grad, w64.grad, 2**-5)
