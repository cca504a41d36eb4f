"""Prefix caching in the native engine (issue #16): a hit never changes results (greedy
parity with transformers.generate, seeded sampling equal token for token with the cache
off), a conversation's next turn reuses its history, eviction under a small bound, a
cancel while blocks are shared leaves them intact, and the vLLM-style metrics."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.kernels import SamplingParams
from rlhfkit.server.engine import Engine
from rlhfkit.server.metrics import ServerMetrics
from rlhfkit.server.models import load_checkpoint
from rlhfkit.server.prefix_cache import PrefixCache, Row
from rlhfkit.training.tiny import sample_corpus

N = 10


class Tokens(list):
    def __init__(self):
        super().__init__()
        self.logprobs = []


def assert_exact(hf, ids, tokens):
    """Greedy tokens as transformers.generate gives them, log-probs as a float64 forward."""
    assert list(tokens) == reference(hf, ids, len(tokens))
    assert tokens.logprobs == pytest.approx(reference_logprobs(hf, ids, list(tokens)), abs=2e-5)


@pytest.fixture(scope="module")
def lm(tiny_policy_dir):
    return load_checkpoint(str(tiny_policy_dir), "policy", device="cpu")


@pytest.fixture(scope="module")
def hf(tiny_policy_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    ids = tiny_tokenizer.encode(" ".join(sample_corpus()), add_special_tokens=False)
    return [ids[i * 37:i * 37 + 70] for i in range(4)]  # 70 tokens: 4 whole blocks + 6


def reference(hf, ids, n=N):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def reference_logprobs(hf, ids, tokens):
    """log p of each generated token from one float64 forward over prompt + tokens: a wrong
    cached K/V moves these even where the tiny model's argmax does not move."""
    model = hf.double()
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    finally:
        hf.float()


def submit(engine, ids, n=N, **sampling):
    """(request, done event, tokens list) of one completion; the tokens list has .logprobs."""
    done, tokens = threading.Event(), Tokens()

    def on_output(outs):
        for o in outs:
            tokens.extend(o.token_ids)
            tokens.logprobs.extend(o.logprobs)
            if o.finish_reason:
                done.set()

    params = SamplingParams(**{"max_new_tokens": n, "ignore_eos": True, "temperature": 0.0, **sampling})
    return engine.add_request(ids, params, on_output), done, tokens


def run(engine, ids, n=N, **sampling):
    _, done, tokens = submit(engine, ids, n, **sampling)
    assert done.wait(60)
    return tokens


def idle(engine):
    while engine.num_running or engine.num_waiting:
        threading.Event().wait(0.01)
    threading.Event().wait(0.1)


@pytest.fixture()
def engine(lm):
    e = Engine(lm, prefix_cache_tokens=4096, metrics=ServerMetrics())
    yield e
    e.shutdown()


def test_a_hit_gives_what_transformers_gives(engine, hf, prompts):
    ids = prompts[0]
    first = run(engine, ids)
    assert len(engine.prefix_cache.blocks) >= 4  # the prompt's 4 whole blocks (and the reply's, at the end)
    again = run(engine, ids)
    assert first == again
    assert_exact(hf, ids, first)
    assert_exact(hf, ids, again)
    m = engine.metrics
    assert m.prefix_cache_queries._value.get() == 2 * len(ids)
    assert m.prefix_cache_hits._value.get() == 64  # the second lookup: 4 blocks of 16 (one token is left)


def test_seeded_sampling_is_the_same_with_and_without_the_cache(lm, engine, prompts):
    off = Engine(lm, prefix_cache_tokens=0)
    try:
        for ids in prompts[:2]:
            run(engine, ids)  # cache the prompt
            for seed in (1, 2):
                kw = dict(temperature=1.0, top_p=0.9, seed=seed)
                assert run(engine, ids, **kw) == run(off, ids, **kw)
    finally:
        off.shutdown()
    assert engine.metrics.prefix_cache_hits._value.get() >= 4 * 64


def test_the_next_turn_reuses_the_history(engine, hf, prompts, tiny_tokenizer):
    """Turn 2 resends turn 1's prompt and reply plus a new message: the cache holds the reply's
    blocks too (from the finished row), so only the new message is prefilled."""
    ids = prompts[1]
    reply = run(engine, ids, n=30)
    turn2 = ids + reply + tiny_tokenizer.encode(" and then the dog", add_special_tokens=False)
    hits = engine.metrics.prefix_cache_hits._value.get()
    assert_exact(hf, turn2, run(engine, turn2))
    # The first 99 tokens (prompt 70 + the reply's 29 with K/V) were cached: 6 whole blocks.
    assert engine.metrics.prefix_cache_hits._value.get() - hits == 6 * 16


def test_hits_and_misses_admitted_together_and_a_long_suffix_in_chunks(lm, hf, prompts):
    e = Engine(lm, prefix_cache_tokens=4096, max_prefill_tokens=24)
    try:
        run(e, prompts[2][:40])  # caches 2 blocks of prompts[2]
        jobs = [submit(e, ids) for ids in (prompts[2], prompts[3], prompts[2][:40] + prompts[0][:50])]
        for ids, (_, done, tokens) in zip((prompts[2], prompts[3], prompts[2][:40] + prompts[0][:50]), jobs):
            assert done.wait(60)
            assert_exact(hf, ids, tokens)  # a 38- and a 58-token suffix: chunks of 24
    finally:
        e.shutdown()


def test_eviction_under_a_small_bound(lm, hf, prompts):
    e = Engine(lm, prefix_cache_tokens=48)  # 3 blocks
    try:
        for ids in prompts + prompts[:1]:
            assert_exact(hf, ids, run(e, ids))
            assert len(e.prefix_cache.blocks) <= 3
    finally:
        e.shutdown()
    cache = PrefixCache(max_tokens=32, block_size=4)
    def kv(layer):  # position p's K is p, its V -p: a lookup must give them back in order
        k = torch.arange(16, dtype=torch.float32)[None, None, :, None].expand(1, 1, 16, 2)
        return k, -k
    cache.insert([Row([1, 2, 3, 4, 5, 6, 7, 8, 9], 9)], 1, kv)  # blocks A=[1..4], B=[5..8]
    cache.insert([Row([1, 2, 3, 4, 7, 7, 7, 7], 8)], 1, kv)  # A shared, C=[7,7,7,7]
    assert len(cache.blocks) == 3
    assert [len(cache.lookup(p)) for p in ([1, 2, 3, 4, 5, 6, 7, 8, 0], [1, 2, 3, 4, 7, 7, 7, 7, 0])] == [2, 2]
    assert len(cache.lookup([1, 2, 3, 4, 5, 6, 7, 8])) == 1  # whole prompt cached: one token must be left
    for i in range(3):  # 6 more blocks: 9 > 8, the least recently used leaves go first, A (shared) stays
        cache.insert([Row([1, 2, 3, 4, 20 + i, 0, 0, 0, 30 + i, 0, 0, 0], 12)], 1, kv)
    assert len(cache.blocks) == 8 and len(cache.lookup([1, 2, 3, 4, 0])) == 1
    k, v = cache.stacked(cache.lookup([1, 2, 3, 4, 22, 0, 0, 0, 32, 0, 0, 0, 5]), 0)
    assert k.shape == (1, 1, 12, 2) and k[0, 0, :, 0].tolist() == list(range(12)) and torch.equal(v, -k)
    with pytest.raises(ValueError, match="at least one block"):
        PrefixCache(max_tokens=8, block_size=16)


def test_one_insert_of_many_rows_copies_each_block_from_its_own_row():
    # Row r's K at position p is 1000 r + p (V its negative); row 1 is left-padded by 4.
    k = (1000 * torch.arange(3.0)[:, None] + torch.arange(12.0))[:, None, :, None].expand(3, 1, 12, 2)
    cache = PrefixCache(max_tokens=12, block_size=4)  # 3 blocks: the 6 new ones evict within the insert
    rows = [Row([1, 2, 3, 4, 5, 6, 7, 8, 9], 8, 0), Row([9, 9, 9, 9, 8, 8, 8, 8, 1], 8, 1, 4),
            Row([5, 5, 5, 5, 6, 6, 6, 6, 2], 8, 2)]
    cache.insert(rows, 1, lambda layer: (k, -k))
    assert len(cache.blocks) == 3 and sorted(b.slot for b in cache.blocks.values()) == [0, 1, 2]
    found = cache.lookup(rows[2].ids)  # both its blocks stay (the most recent), in slots reused from row 0
    assert len(found) == 2
    got_k, got_v = cache.stacked(found, 0)
    assert got_k[0, 0, :, 0].tolist() == [2000.0 + p for p in range(8)] and torch.equal(got_v, -got_k)
    found = cache.lookup(rows[1].ids)  # its second block was evicted for row 2's; its first is intact
    assert len(found) == 1 and cache.stacked(found, 0)[0][0, 0, :, 0].tolist() == [1004.0, 1005.0, 1006.0, 1007.0]
    assert cache.lookup(rows[0].ids) == []


def test_a_cancel_while_blocks_are_shared_leaves_them_intact(engine, hf, prompts):
    ids = prompts[3]
    run(engine, ids)
    idle(engine)  # the finished row's blocks are put in the cache after its last token is sent
    pc = engine.prefix_cache
    before = {key: pc.stacked([b], 0) for key, b in pc.blocks.items()}
    jobs = [submit(engine, ids, n=40) for _ in range(3)]
    while len(jobs[1][2]) < 5:  # the second is well into its reply
        threading.Event().wait(0.005)
    engine.abort(jobs[1][0])
    for i in (0, 2):
        assert jobs[i][1].wait(60)
        assert_exact(hf, ids, jobs[i][2])
    idle(engine)
    for key, (k, v) in before.items():
        if key in engine.prefix_cache.blocks:
            now_k, now_v = pc.stacked([pc.blocks[key]], 0)
            assert torch.equal(now_k, k) and torch.equal(now_v, v)
    assert_exact(hf, ids, run(engine, ids))
