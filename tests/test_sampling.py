"""Sampling ops against an independent float64 reference of the filtered distribution."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rlhfkit.kernels import SamplingParams, SamplingParamsError, sample_tokens


def reference_distribution(logits, temperature, top_k, top_p):
    """vLLM's semantics written out plainly in float64: scale, keep the top k, then the
    smallest most-likely prefix whose probability reaches top_p, renormalise."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if top_k:
        order = order[:top_k]
    z = np.array([x[i] for i in order])
    p = np.exp(z - z.max())
    p /= p.sum()
    kept, mass = [], 0.0
    for i, pi in zip(order, p):
        kept.append(i)
        mass += pi
        if mass >= top_p:
            break
    q = np.zeros(len(x))
    q[kept] = np.exp(x[kept] - x[kept].max())
    return q / q.sum()


LOGITS = [2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, 1.1, -0.2]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.5, 4, 1.0),
    (1.0, 0, 0.8),
    (0.8, 6, 0.7),
    (2.0, 3, 0.95),
    (0.5, 0, 0.6),
])
# 3 candidates: top-k <= 3 rows and rows whose 3 most likely tokens reach top_p skip the full
# sort, the others fall back to it (both paths run in the list above).
@pytest.mark.parametrize("candidates", [1024, 3])
def test_empirical_distribution_matches_filtered_softmax(temperature, top_k, top_p, candidates, monkeypatch):
    monkeypatch.setattr("rlhfkit.kernels.sampling.SORT_CANDIDATES", candidates)
    draws = 40_000
    logits = torch.tensor(LOGITS).repeat(draws, 1)
    g = torch.Generator().manual_seed(1234)
    tokens = sample_tokens(logits, torch.full((draws,), temperature), torch.full((draws,), top_k),
                           torch.full((draws,), top_p), default_generator=g)
    counts = np.bincount(tokens.numpy(), minlength=len(LOGITS))
    expected = reference_distribution(LOGITS, temperature, top_k, top_p)
    # Filtered-out tokens must never be drawn.
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    chi2 = stats.chisquare(counts[keep], expected[keep] * draws)
    assert chi2.pvalue > 1e-3, (counts, expected * draws)


def test_mixed_rows_each_follow_their_own_parameters():
    # Two parameter sets interleaved in one batch: each half matches its own reference.
    draws = 20_000
    params = [(0.7, 0, 0.9), (1.3, 5, 1.0)]
    rows = [params[i % 2] for i in range(2 * draws)]
    logits = torch.tensor(LOGITS).repeat(2 * draws, 1)
    t = torch.tensor([r[0] for r in rows])
    k = torch.tensor([r[1] for r in rows])
    p = torch.tensor([r[2] for r in rows])
    tokens = sample_tokens(logits, t, k, p, default_generator=torch.Generator().manual_seed(7)).numpy()
    for j, (temp, top_k, top_p) in enumerate(params):
        counts = np.bincount(tokens[j::2], minlength=len(LOGITS))
        expected = reference_distribution(LOGITS, temp, top_k, top_p)
        assert counts[expected == 0].sum() == 0
        keep = expected > 0
        assert stats.chisquare(counts[keep], expected[keep] * draws).pvalue > 1e-3


def test_top_k_1_and_zero_temperature_are_greedy():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    ones = torch.ones(64)
    top1 = sample_tokens(logits, ones, torch.ones(64, dtype=torch.long), ones)
    greedy = sample_tokens(logits, torch.zeros(64), torch.zeros(64, dtype=torch.long), ones)
    assert torch.equal(top1, argmax)
    assert torch.equal(greedy, argmax)


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    tokens = sample_tokens(logits, torch.ones(32), torch.zeros(32, dtype=torch.long), torch.full((32,), 1e-6))
    assert torch.equal(tokens, logits.argmax(-1))


def test_masked_vocabulary_is_never_sampled():
    logits = torch.randn(2000, 20)
    logits[:, ::2] = float("-inf")
    tokens = sample_tokens(logits, torch.ones(2000), torch.zeros(2000, dtype=torch.long), torch.ones(2000))
    assert (tokens % 2 == 1).all()


@pytest.mark.parametrize("top_p", [0.95, 1.0])  # a filtered (sorted) row and a temperature-only one
@pytest.mark.parametrize("candidates", [1024, 64])  # 64: top-k 50 neighbours skip the full sort
def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch(top_p, candidates, monkeypatch):
    monkeypatch.setattr("rlhfkit.kernels.sampling.SORT_CANDIDATES", candidates)
    torch.manual_seed(0)
    row = torch.randn(1, 300)
    params = SamplingParams(temperature=0.9, top_p=top_p, seed=42)

    def run(batch_size, position):
        out = []
        g = params.generator(0)
        others = torch.Generator().manual_seed(batch_size)
        for _ in range(50):
            logits = torch.randn(batch_size, 300, generator=others)
            logits[position] = row[0]
            gens = [None] * batch_size
            gens[position] = g
            t = torch.full((batch_size,), 0.9)
            if position != 0:
                t[0] = 0.0  # a greedy neighbour consumes no randomness
            # Neighbours of both kinds, filtered and temperature-only, change nothing.
            p = torch.where(torch.arange(batch_size) % 2 == 0, 0.8, 1.0)
            k = torch.where(torch.arange(batch_size) % 3 == 0, 50, 0)
            p[position], k[position] = top_p, 0
            tok = sample_tokens(logits, t, k, p, gens, default_generator=others)
            out.append(int(tok[position]))
        return out

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(17, 9) == alone
    assert len(set(alone)) > 5  # it really samples


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(n=0), "n"),
    (dict(n=17), "n"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(logprobs=21), "logprobs"),
    (dict(seed=-1), "seed"),
])
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_boundaries_are_accepted():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, n=16, max_new_tokens=1, logprobs=20, seed=2**64 - 1)
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=math.nextafter(1e-5, 1)).greedy


def test_a_draw_rounded_past_the_end_lands_on_the_last_token_with_mass():
    from rlhfkit.kernels.sampling import _invert_cdf

    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.0, 0.8, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # u = 1 is what rounding can make of u * total; u = 0.3 is an ordinary draw.
    assert _invert_cdf(probs, torch.tensor([1.0, 1.0, 1.0])).tolist() == [1, 2, 3]
    assert _invert_cdf(probs, torch.tensor([0.3, 0.3, 0.3])).tolist() == [0, 2, 1]
