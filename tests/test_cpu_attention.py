"""The CPU decode-attention kernel against float64 math, and its dispatch inside transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.server import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the C++ extension could not be built here")


def reference(q, k, v, mask, scale):
    """float64 softmax(q k^T * scale) v, each query head on its group's K/V head."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_matches_float64_on_strided_slot_views(dtype, tol, heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    B, D, W, cap = 5, 32, 37, 64
    q = torch.randn(B, heads, 1, D, generator=g).to(dtype)
    # The slot cache's layout: buffers [rows, kv_heads, capacity, D], read as [:B, :, :W] views.
    kbuf, vbuf = (torch.randn(B + 2, kv_heads, cap, D, generator=g).to(dtype) for _ in range(2))
    k, v = kbuf[:B, :, :W], vbuf[:B, :, :W]
    lens = torch.tensor([37, 1, 20, 36, 5])
    mask = (torch.arange(W) < lens[:, None])[:, None, None, :]
    scale = D ** -0.5
    out = cpu_attention.decode_attention(q, k, v, mask, scale)
    assert out.shape == (B, heads, 1, D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, scale), atol=tol, rtol=tol)
    # No mask: every column counts.
    torch.testing.assert_close(cpu_attention.decode_attention(q, k, v, None, 0.5).double(),
                               reference(q, k, v, None, 0.5), atol=tol, rtol=tol)


def test_a_masked_column_is_never_read():
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    before = cpu_attention.decode_attention(q, k, v, mask, 1.0)
    k[0, :, 4:], v[0, :, 4:] = float("nan"), float("inf")  # what a masked column holds must not matter
    assert torch.equal(cpu_attention.decode_attention(q, k, v, mask, 1.0), before)


def test_bad_shapes_are_refused():
    q, k = torch.randn(2, 3, 1, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(RuntimeError, match="multiple of K/V heads"):
        cpu_attention.decode_attention(q, k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="q \\[B, Hq, 1, D\\]"):
        cpu_attention.decode_attention(torch.randn(2, 2, 3, 8), k, k, None, 1.0)


def test_inside_transformers_decode_takes_the_kernel_and_prefill_stays_sdpa(tiny_policy_dir, monkeypatch):
    ref = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float64).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    model.set_attn_implementation(cpu_attention.register())
    calls = []
    kernel = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *a: calls.append(a[0].shape) or kernel(*a))
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [0, 0, 11, 4, 8, 30]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # left padding
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        full = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
        expect = ref(out.sequences, attention_mask=full).logits[:, 5:-1]
    # 5 decode steps on the kernel (batch 2, one query each); the prompt's forward on sdpa.
    assert calls and all(s[0] == 2 and s[2] == 1 for s in calls) and len(calls) == 5 * model.config.num_hidden_layers
    torch.testing.assert_close(torch.stack(out.logits, 1).double(), expect, atol=2e-5, rtol=2e-5)


def test_only_calls_it_computes_exactly_reach_the_kernel():
    module = torch.nn.Linear(1, 1).eval()
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    takes = lambda q=q, k=k, v=k, mask=mask, dropout=0.0, **kw: cpu_attention._kernel_takes(module, q, k, v, mask,
                                                                                             dropout, kw)
    assert takes() and takes(mask=None) and takes(sliding_window=6, position_ids=torch.zeros(2, 1), is_causal=True)
    assert not takes(q=torch.randn(2, 4, 3, 8))  # prefill
    assert not takes(sliding_window=5)  # a window shorter than the columns
    assert not takes(softcap=30.0) and not takes(s_aux=torch.zeros(4)) and not takes(position_bias=torch.zeros(1))
    assert not takes(mask=mask.float()) and not takes(mask=mask[:, :, :, :5]) and not takes(mask=torch.ones(2, 4, 1, 6).bool())
    assert not takes(dropout=0.1) and not takes(v=torch.randn(2, 2, 6, 4)) and not takes(k=k.to(torch.bfloat16))
    assert not takes(q=torch.randn(2, 4, 1, 8, requires_grad=True))  # no backward: autograd would lose it
    with torch.no_grad():
        assert takes(q=torch.randn(2, 4, 1, 8, requires_grad=True))
    module.train()
    assert not takes()


def test_the_engine_selects_it_on_cpu(tiny_policy_dir):
    from rlhfkit.server.engine import Engine
    from rlhfkit.server.models import load_checkpoint

    lm = load_checkpoint(tiny_policy_dir, "policy", "cpu")
    engine = Engine(lm)
    try:
        assert lm.model.config._attn_implementation == cpu_attention.NAME
    finally:
        engine.shutdown()
