"""Every causal-LM family the native engine serves, against plain transformers.

For each family a tiny random policy and reward model (hidden 64, 2 layers, 4 heads, head dim
16, the tokenizer trained on the spot) are served by one real server on loopback:

- greedy generation over gRPC, and through the server's engine with every admission path at
  once (a left-padded prefill of three prompts of different lengths, a fourth prompt joining
  the running batch, a 40-token prompt prefilled in chunks of 16 between decode steps), must
  give exactly the token ids of `model.generate(do_sample=False)` run on each prompt alone;
- Score (a right-padded batch) must equal a plain forward of the sequence-classification
  model on each unpadded sequence.

Sliding-window variants use a window of 8 tokens, shorter than every prompt + generation
but one, and check that the window really changes the reference's output (so parity is not
full attention in disguise). A family whose sliding window the engine has not been verified
against is refused at load, with the reason.
"""

import concurrent.futures
import copy
import time

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Gemma2Config,
                          Gemma3TextConfig, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config, Starcoder2Config)

from rlhfkit.clients import Client
from rlhfkit.kernels import SamplingParams
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.models import load_checkpoint

WINDOW = 8
MAX_NEW = 12
PROMPTS = [
    "the cat",  # 2 tokens
    "a",  # 1
    "what is the large blue river and why is it",  # 10
    "one two three four five six seven eight nine ten red green blue small large",  # 15
    "count 17 stones and write the words in a short list, then sort the numbers 3 9 27 81 and "
    "reverse the letters of every word of this long sentence please",  # 40: prefilled in chunks
]
RESPONSES = [" is red", " two three four five six seven eight nine", "", " and a blue river", " 3 9 27 81"]
MAX_PREFILL = 16  # the three shortest prompts prefill together, the 15-token one joins, the 40-token one is chunked


def _common(tok):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)


FAMILIES = {
    "llama": lambda t: LlamaConfig(**_common(t)),
    "qwen2": lambda t: Qwen2Config(**_common(t)),
    "mistral": lambda t: MistralConfig(**_common(t), sliding_window=None),
    # GPT-2: learned absolute positions, fused qkv, and (below) a tokenizer without a pad token.
    "gpt2": lambda t: GPT2Config(vocab_size=len(t), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id),
    "gemma": lambda t: GemmaConfig(**_common(t), head_dim=16),
    "phi3": lambda t: Phi3Config(**_common(t), sliding_window=None),
    # Sliding windows shorter than prompt + generation: every layer (Mistral, Phi-3), or mixed
    # with full layers (Qwen2's max_window_layers, Gemma 2 and 3 alternating; Gemma 2 runs eager
    # attention with logit soft-capping).
    "mistral-sliding": lambda t: MistralConfig(**_common(t), sliding_window=WINDOW),
    "phi3-sliding": lambda t: Phi3Config(**_common(t), sliding_window=WINDOW),
    "qwen2-sliding": lambda t: Qwen2Config(**_common(t), use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=1),
    "gemma2-sliding": lambda t: Gemma2Config(**_common(t), head_dim=16, sliding_window=WINDOW),
    "gemma3-sliding": lambda t: Gemma3TextConfig(**_common(t), head_dim=16, sliding_window=WINDOW,
                                                     layer_types=["sliding_attention", "full_attention"]),
}


def _save(out, config, tokenizer, reward: bool, seed: int):
    torch.manual_seed(seed)
    if reward:
        config = copy.deepcopy(config)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tiny_tokenizer):
    name = request.param
    tok = copy.deepcopy(tiny_tokenizer)
    if name == "gpt2":
        tok.pad_token = None  # GPT-2 ships without one; the server pads with EOS, masks hide it
    config = FAMILIES[name](tok)
    root = tmp_path_factory.mktemp(name)
    policy = _save(root / "policy", config, tok, reward=False, seed=0)
    reward = _save(root / "reward", config, tok, reward=True, seed=1)
    srv = ServerThread(ServeConfig(policy=str(policy), reward=str(reward), port=0, device="cpu",
                                   max_prefill_tokens=MAX_PREFILL, reload_interval=0,
                                   feedback_db=f"sqlite:///{root / 'feedback.db'}")).wait_loaded()
    client = Client(srv.address, timeout=60)
    yield name, policy, reward, srv, client
    client.close()
    srv.stop()


def _reference_greedy(policy_dir, **config_overrides):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, **config_overrides).eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return tok, out


def _engine_greedy(srv, tok):
    """Queue every prompt before the engine thread looks, so admission is deterministic."""
    eng = srv.server.state.registry.get("", "policy").engine
    got = {i: [] for i in range(len(PROMPTS))}
    reqs = []
    with eng._cv:  # the engine thread cannot admit until all are queued
        for i, p in enumerate(PROMPTS):
            reqs.append(eng.add_request(tok(p).input_ids, SamplingParams(temperature=0, max_new_tokens=MAX_NEW),
                                        lambda outs, i=i: [got[i].extend(o.token_ids) for o in outs]))
    deadline = time.monotonic() + 60
    while not all(r.finished for r in reqs):
        assert time.monotonic() < deadline, "engine did not finish"
        time.sleep(0.01)
    return [got[i] for i in range(len(PROMPTS))]


def test_greedy_matches_transformers_generate(family):
    name, policy, _, srv, client = family
    tok, expected = _reference_greedy(policy)
    assert _engine_greedy(srv, tok) == expected
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        resps = list(pool.map(lambda p: client.generate(p, max_new_tokens=MAX_NEW), PROMPTS))
    assert [list(r.completions[0].token_ids) for r in resps] == expected
    if name.endswith("-sliding"):
        # The window matters here: with full attention the reference continues differently.
        _, full = _reference_greedy(policy, sliding_window=4096)
        assert full != expected


def test_score_matches_a_plain_forward(family):
    _, _, reward, _, client = family
    tok = AutoTokenizer.from_pretrained(reward)
    if tok.pad_token is None:
        assert family[0] == "gpt2"
    rm = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    expected = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([tok(p + r).input_ids])  # unpadded, one at a time
            expected.append(rm(input_ids=ids).logits[0, 0].item())
    got = client.score(list(zip(PROMPTS, RESPONSES)))  # one right-padded batch
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(x, 4) for x in got)) == len(got)  # distinct sequences, distinct rewards


def test_gpt2_checkpoint_has_no_pad_token(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    d = _save(tmp_path / "gpt2", FAMILIES["gpt2"](tok), tok, reward=False, seed=0)
    assert AutoTokenizer.from_pretrained(d).pad_token is None
    lm = load_checkpoint(d, "policy", device="cpu")
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id  # batching pads with EOS


def test_sliding_window_of_an_unverified_family_is_refused_with_the_reason(tmp_path, tiny_tokenizer):
    config = Starcoder2Config(**{**_common(tiny_tokenizer), "intermediate_size": 128}, sliding_window=WINDOW)
    d = _save(tmp_path / "sc2", config, tiny_tokenizer, reward=False, seed=0)
    with pytest.raises(ValueError, match=r"sliding-window attention \(window 8, shorter than the context\).*"
                                         r"'starcoder2'"):
        load_checkpoint(d, "policy", device="cpu")
    # The same model as a reward model is scored by one plain forward: nothing to refuse.
    rm = _save(tmp_path / "sc2-rm", config, tiny_tokenizer, reward=True, seed=0)
    assert load_checkpoint(rm, "reward", device="cpu").attention.window == WINDOW
    # A window as long as the context hides nothing: served as full attention.
    config.sliding_window = 256
    d = _save(tmp_path / "sc2-full", config, tiny_tokenizer, reward=False, seed=0)
    assert load_checkpoint(d, "policy", device="cpu").attention.window is None
