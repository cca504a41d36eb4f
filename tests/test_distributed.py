"""Training under torchrun: SFT, RM, DPO and PPO in two real processes (gloo on CPU), with
torch's DistributedDataParallel and again with FSDP2 (--fsdp).

One `torchrun --nproc_per_node 2` run trains every stage (tests/distributed_worker.py); SFT,
RM and DPO then train in this one process with the same global batches (PPO cannot: each
rank samples its own rollouts). Global batches of 5 split 3 + 2, with micro-batches of 2, so
the ranks' shards differ in size and tokens. Each of these breaks a test: no sharding, no
gradient sum, averaged instead of summed gradients, per-rank token normalisation, a loss or
KL logged from one rank only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker
import pytest
import torch
import torch.distributed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.training import losses, task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.data import write_jsonl

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORKER = Path(distributed_worker.__file__)
STAGES = ("sft", "rm", "dpo", "ppo")


def stage_configs(data: Path, out: Path, policy, reward) -> dict[str, dict]:
    common = dict(batch_size=5, micro_batch_size=2, max_steps=3, learning_rate=1e-2, warmup_steps=1, log_every=1,
                  eval_every=2, progress=False, device="cpu")
    configs = {
        "sft": dict(model=str(policy), train_file=str(data / "sft.jsonl"), eval_file=str(data / "sft_eval.jsonl"), **common),
        "rm": dict(model=str(policy), train_file=str(data / "rankings.jsonl"), eval_file=str(data / "rankings.jsonl"),
                   sft_file=str(data / "sft.jsonl"), data_format="rankings", **common),
        "dpo": dict(model=str(policy), train_file=str(data / "prefs.jsonl"), eval_file=str(data / "prefs_eval.jsonl"),
                    **common),
        # 6 prompts in rollouts of 4: every other rollout is the epoch's last 2. The adaptive KL
        # controller is on (kl_target), and so is PPO-ptx.
        "ppo": dict(model=str(policy), reward_model=str(reward), prompts_file=str(data / "prompts.jsonl"),
                    eval_prompts_file=str(data / "prompts_eval.jsonl"), ptx_file=str(data / "sft.jsonl"), ptx_coef=0.5,
                    kl_target=1.0, kl_horizon=20, num_iterations=3, rollout_batch_size=4, minibatch_size=2,
                    max_new_tokens=4, learning_rate=1e-3, progress=False, device="cpu"),
    }
    for stage, config in configs.items():
        config.update(output_dir=str(out / stage), log_dir=str(out / f"log-{stage}"))
    return configs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    """Train every stage under torchrun (root/two) and SFT, RM, DPO in this process (root/one)."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    write_jsonl(data / "sft.jsonl", task.sft_records(10, seed=1))
    write_jsonl(data / "sft_eval.jsonl", task.sft_records(5, seed=2))
    pairs = task.preference_records(3, seed=3)
    write_jsonl(data / "rankings.jsonl", task.ranking_records(7, k=3, seed=4) +
                [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]} for p in pairs])
    write_jsonl(data / "prefs.jsonl", task.preference_records(10, seed=5))
    write_jsonl(data / "prefs_eval.jsonl", task.preference_records(5, seed=6))
    write_jsonl(data / "prompts.jsonl", task.prompt_records(6, seed=7))
    write_jsonl(data / "prompts_eval.jsonl", task.prompt_records(3, seed=8))

    (root / "dumps").mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps(stage_configs(data, root / "two", tiny_policy_dir, tiny_reward_dir)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(spec), str(root / "dumps")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process; tiny models train fastest so
    try:
        for stage, config in stage_configs(data, root / "one", tiny_policy_dir, tiny_reward_dir).items():
            if stage != "ppo":
                config_cls, train = distributed_worker.TRAINERS[stage]
                train(config_cls(**config))
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def fsdp_runs(runs, tiny_policy_dir, tiny_reward_dir):
    """Every stage again under torchrun with --fsdp (FSDP2 over gloo on CPU), on the data and
    global batches of `runs`; SFT saves at step 2 on the way (a collective save), DPO takes
    each rank's uneven shard in one micro-batch."""
    configs = stage_configs(runs / "data", runs / "fsdp", tiny_policy_dir, tiny_reward_dir)
    for config in configs.values():
        config["fsdp"] = True
    configs["sft"]["save_every"] = 2
    configs["dpo"]["micro_batch_size"] = 0  # the whole shard at once: 3 + 2 pairs, one forward on each rank
    # SFT under DDP saving at step 2 (resumed in test_fsdp_run_resumes_from_its_save)
    configs["sft-ddp"] = {**stage_configs(runs / "data", runs / "ddp", tiny_policy_dir, tiny_reward_dir)["sft"],
                          "save_every": 2}
    # and PPO with LoRA under DDP: only the adapters (and the value head) are reduced
    configs["ppo-lora"] = {**stage_configs(runs / "data", runs / "lora", tiny_policy_dir, tiny_reward_dir)["ppo"],
                           "lora_r": 4, "lora_alpha": 8.0}
    # GRPO selecting an earlier evaluation than the last (a KL penalty of 50 in the objective,
    # a learning rate that moves the policy far): the ranks must all restore the kept weights
    for name, fsdp in (("grpo-select", False), ("grpo-select-fsdp", True)):
        configs[name] = dict(model=str(tiny_policy_dir), reward_model=str(tiny_reward_dir),
                             prompts_file=str(runs / "data" / "prompts.jsonl"),
                             eval_prompts_file=str(runs / "data" / "prompts_eval.jsonl"), eval_every=1,
                             num_iterations=3, prompts_per_iteration=2, num_generations=2, max_new_tokens=4,
                             learning_rate=3e-2, kl_coef=50.0, kl_in="reward", kl_estimator="k1", fsdp=fsdp,
                             output_dir=str(runs / name), log_dir=str(runs / f"log-{name}"), progress=False,
                             device="cpu")
    (runs / "fsdp-dumps").mkdir()
    spec = runs / "fsdp-spec.json"
    spec.write_text(json.dumps(configs))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(spec), str(runs / "fsdp-dumps")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return runs


def dump(root, stage, rank, dumps="dumps"):
    return torch.load(root / dumps / f"{stage}-rank{rank}.pt")


def rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", STAGES)
def test_ranks_end_with_identical_parameters_and_metrics(runs, stage):
    rank0, rank1 = dump(runs, stage, 0), dump(runs, stage, 1)
    assert len(rank0["params"]) == len(rank1["params"]) > 0
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)  # bit for bit
    # Every logged statistic is over all ranks' examples (PPO: scores, KL and the adaptive KL
    # coefficient, the minibatch losses, the evals), so both ranks return the same metrics.
    assert rank0["metrics"].pop("seconds") >= 0 and rank1["metrics"].pop("seconds") >= 0
    assert rank0["metrics"] == rank1["metrics"]
    # and the published checkpoint is rank 0's model
    saved = load_file(runs / "two" / stage / "model.safetensors")
    assert any(torch.equal(p, saved["lm_head.weight" if stage != "rm" else "score.weight"]) for p in rank0["params"])


def assert_same_updates(two: dict, one: dict, start: dict):
    # Each tensor's update must agree to 2e-3 of its size. Elementwise, Adam's lr * g / (|g| + eps)
    # turns summation-order noise in gradients near 0 (two halves added, against one pass)
    # into differences of up to ~lr in a few elements; a wrongly weighted or unsummed gradient
    # moves whole tensors (1e-1 and more).
    assert two.keys() == one.keys()
    for key in one:
        update = one[key] - start.get(key, torch.zeros_like(one[key]))  # the RM's score head starts random
        assert (two[key] - one[key]).norm() <= 2e-3 * update.norm(), key


def assert_same_rows(got: list[dict], want: list[dict]):
    """Two metrics logs of the same run: the same steps, keys and values (but the clock)."""
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a.keys() - {"time"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_train_as_one_with_the_same_global_batch(runs, tiny_policy_dir, stage):
    assert_same_updates(load_file(runs / "two" / stage / "model.safetensors"),
                        load_file(runs / "one" / stage / "model.safetensors"),
                        load_file(tiny_policy_dir / "model.safetensors"))
    # The logged curves too: the loss is the whole batch's (the ranks' shares add up), the
    # gradient norm is the summed gradient's, accuracies and rewards count every rank's pairs.
    assert_same_rows(rows(runs / "two" / f"log-{stage}"), rows(runs / "one" / f"log-{stage}"))
    info_two, info_one = read_info(runs / "two" / stage), read_info(runs / "one" / stage)
    for key in info_one["metrics"].keys() - {"seconds"}:
        assert info_two["metrics"][key] == pytest.approx(info_one["metrics"][key], rel=1e-4, abs=1e-6), key


def test_rank_zero_alone_writes_and_the_checkpoints_load(runs):
    two = runs / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(STAGES + tuple(f"log-{s}" for s in STAGES))
    for stage in STAGES:
        assert sorted(p.name for p in (two / f"log-{stage}").iterdir()) == ["curves.png", "metrics.jsonl"]
        steps = [r["step"] for r in rows(two / f"log-{stage}")]
        assert steps == ([0, 1, 2, 3] if stage == "ppo" else [1, 2, 3])  # one writer: no line twice
        assert read_info(two / stage)["stage"] == stage
        loader = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        loader.from_pretrained(two / stage)  # as `rlhfkit serve` loads it


def test_ppo_whitens_and_controls_kl_over_all_ranks(runs):
    x, mask = distributed_worker.whiten_inputs()
    expected = losses.whiten(x, mask)
    for rank in (0, 1):
        got = torch.load(runs / "dumps" / f"whiten-rank{rank}.pt")
        torch.testing.assert_close(got, expected[rank::2])
    metrics = read_info(runs / "two" / "ppo")["metrics"]
    assert metrics["kl_coef"] != 0.05  # the controller moved it (identically on both ranks: see above)
    assert "eval_task_utility" in metrics and "ptx_loss" in rows(runs / "two" / "log-ppo")[1]


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_ranks_agree_and_publish_whole_checkpoints(fsdp_runs, stage):
    rank0, rank1 = dump(fsdp_runs, stage, 0, "fsdp-dumps"), dump(fsdp_runs, stage, 1, "fsdp-dumps")
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)  # the gathered weights: one model, sharded
    assert rank0["metrics"].pop("seconds") >= 0 and rank1["metrics"].pop("seconds") >= 0
    assert rank0["metrics"] == rank1["metrics"]
    loader = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    loader.from_pretrained(fsdp_runs / "fsdp" / stage)  # the published checkpoint is whole, and loads
    saved = load_file(fsdp_runs / "fsdp" / stage / "model.safetensors")
    assert any(torch.equal(p, saved["lm_head.weight" if stage != "rm" else "score.weight"]) for p in rank0["params"])


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_fsdp_trains_as_one_process_with_the_same_global_batch(fsdp_runs, tiny_policy_dir, stage):
    assert_same_updates(load_file(fsdp_runs / "fsdp" / stage / "model.safetensors"),
                        load_file(fsdp_runs / "one" / stage / "model.safetensors"),
                        load_file(tiny_policy_dir / "model.safetensors"))
    assert_same_rows(rows(fsdp_runs / "fsdp" / f"log-{stage}"), rows(fsdp_runs / "one" / f"log-{stage}"))
    if stage == "sft":
        assert (fsdp_runs / "fsdp" / "sft.saves" / "step-000002" / "train_state.pt").is_file()


def test_fsdp_ppo_matches_ddp_ppo(fsdp_runs, tiny_policy_dir):
    # Both sample the same rollouts on each rank (same seeds): sharding must not change the run.
    assert_same_updates(load_file(fsdp_runs / "fsdp" / "ppo" / "model.safetensors"),
                        load_file(fsdp_runs / "two" / "ppo" / "model.safetensors"),
                        load_file(tiny_policy_dir / "model.safetensors"))


def test_lora_ppo_under_ddp_keeps_the_ranks_identical(fsdp_runs, tiny_policy_dir):
    rank0, rank1 = dump(fsdp_runs, "ppo-lora", 0, "fsdp-dumps"), dump(fsdp_runs, "ppo-lora", 1, "fsdp-dumps")
    n_full = len(dump(fsdp_runs, "ppo", 0, "fsdp-dumps")["params"])
    assert 0 < len(rank0["params"]) == len(rank1["params"]) and len(rank0["params"]) != n_full  # the adapters only
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    assert rank0["metrics"].pop("seconds") >= 0 and rank1["metrics"].pop("seconds") >= 0
    assert rank0["metrics"] == rank1["metrics"]
    assert (fsdp_runs / "lora" / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    merged, base = load_file(fsdp_runs / "lora" / "ppo" / "model.safetensors"), load_file(tiny_policy_dir / "model.safetensors")
    assert any((merged[k] - base[k]).abs().max() > 0 for k in base)  # the merged adapters moved the policy


def test_fsdp_run_resumes_from_its_save(fsdp_runs, tiny_policy_dir, tiny_reward_dir):
    # The FSDP SFT run saved at step 2 of 3; two processes resume from that save (gathered
    # weights and optimizer state broadcast from rank 0, each rank's RNG) into another output
    # and end with the uninterrupted run's weights. The same for a DDP run.
    config = {**stage_configs(fsdp_runs / "data", fsdp_runs / "fsdp", tiny_policy_dir, tiny_reward_dir)["sft"],
              "fsdp": True, "save_every": 2, "resume": True, "save_dir": str(fsdp_runs / "fsdp" / "sft.saves"),
              "output_dir": str(fsdp_runs / "resumed" / "sft"), "log_dir": str(fsdp_runs / "resumed" / "log-sft")}
    ddp = {**stage_configs(fsdp_runs / "data", fsdp_runs / "ddp", tiny_policy_dir, tiny_reward_dir)["sft"],
           "save_every": 2, "resume": True, "save_dir": str(fsdp_runs / "ddp" / "sft.saves"),
           "output_dir": str(fsdp_runs / "resumed" / "sft-ddp"),
           "log_dir": str(fsdp_runs / "resumed" / "log-sft-ddp")}
    (fsdp_runs / "resumed-dumps").mkdir()
    spec = fsdp_runs / "resumed-spec.json"
    spec.write_text(json.dumps({"sft": config, "sft-ddp": ddp}))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(spec), str(fsdp_runs / "resumed-dumps")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    whole, resumed = load_file(fsdp_runs / "fsdp" / "sft" / "model.safetensors"), \
        load_file(fsdp_runs / "resumed" / "sft" / "model.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)
    whole, resumed = load_file(fsdp_runs / "ddp" / "sft" / "model.safetensors"), \
        load_file(fsdp_runs / "resumed" / "sft-ddp" / "model.safetensors")  # and DDP's
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in rows(fsdp_runs / "resumed" / "log-sft")] == [3]
    assert rows(fsdp_runs / "resumed" / "log-sft")[0]["loss"] == pytest.approx(rows(fsdp_runs / "fsdp" / "log-sft")[2]["loss"],
                                                                              rel=1e-5)


@pytest.mark.parametrize("stage", ["grpo-select", "grpo-select-fsdp"])
def test_selection_restores_the_kept_weights_on_every_rank(fsdp_runs, tiny_policy_dir, stage):
    """The evaluation that wins is an earlier one: rank 0 kept its weights, and every rank
    trains no further from them (DDP: broadcast; FSDP: scattered shards). Published: those."""
    rank0, rank1 = dump(fsdp_runs, stage, 0, "fsdp-dumps"), dump(fsdp_runs, stage, 1, "fsdp-dumps")
    selected = rank0["metrics"]["selected_iteration"]
    assert selected < 3 and rank1["metrics"]["selected_iteration"] == selected
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    if selected == 0:  # the kept weights are the starting policy's
        published = load_file(fsdp_runs / stage / "model.safetensors")
        start = load_file(Path(tiny_policy_dir) / "model.safetensors")
        assert all(torch.equal(published[k], start[k]) for k in start)
