"""GRPO and RLOO end to end on tiny models: rewards from a reward model, a Python function
(with the prompts file's columns) and a running server's Score RPC; the importance ratio of
in-process rollouts; checkpoint selection; micro-batches; the published checkpoint serves."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.critic_free import GRPOConfig, RLOOConfig, train_grpo, train_rloo
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

REWARD_FN = '''
from rlhfkit.training import task

def gold_plus_bonus(prompts, completions, bonus, **columns):
    """The bundled task's utility plus the prompts file's `bonus` column (checked aligned)."""
    expected = {p: b for p, b in zip(PROMPTS, BONUS)}
    assert all(expected[p] == b for p, b in zip(prompts, bonus)), "columns misaligned with the prompts"
    return [task.utility(p, c) + b for p, c, b in zip(prompts, completions, bonus)]

def wrong_count(prompts, completions, **columns):
    return [0.0]
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_free")
    tok = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    prompts = [dict(r, bonus=float(i)) for i, r in enumerate(task.prompt_records(8, seed=3))]
    fn = root / "rewards.py"
    fn.write_text(f"PROMPTS = {[r['prompt'] for r in prompts]!r}\nBONUS = {[r['bonus'] for r in prompts]!r}\n"
                  + REWARD_FN)
    return {"root": root, "policy": make_tiny_checkpoint(root / "policy", "policy", tok),
            "reward": make_tiny_checkpoint(root / "reward", "reward", tok, seed=1), "reward_fn": fn,
            "prompts": write_jsonl(root / "prompts.jsonl", prompts),
            "eval": write_jsonl(root / "eval.jsonl", prompts[:4])}  # with the bonus column the function reads


def args(setup, tmp_path, name="out", **kwargs):
    base = dict(model=str(setup["policy"]), prompts_file=str(setup["prompts"]), output_dir=str(tmp_path / name),
                log_dir=str(tmp_path / f"log-{name}"), num_iterations=2, prompts_per_iteration=4, num_generations=4,
                max_new_tokens=6, learning_rate=1e-3, progress=False, device="cpu")
    base.update(kwargs)
    return base


def log_rows(tmp_path, name="out"):
    return [json.loads(line) for line in (tmp_path / f"log-{name}" / "metrics.jsonl").read_text().splitlines()]


def hf_greedy(path, prompt, n=5):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_grpo_through_the_cli_with_a_reward_model_and_a_function_serves(setup, tmp_path):
    from rlhfkit.clients import Client
    from rlhfkit.server.app import ServeConfig, ServerThread

    out = tmp_path / "out"
    assert train_main(["grpo", "--model", str(setup["policy"]), "--reward-model", str(setup["reward"]),
                       "--reward-fn", f"{setup['reward_fn']}:gold_plus_bonus", "--reward-weights", "1", "0.5",
                       "--prompts-file", str(setup["prompts"]), "--eval-prompts-file", str(setup["eval"]),
                       "--output-dir", str(out), "--log-dir", str(tmp_path / "log-out"), "--num-iterations", "3",
                       "--prompts-per-iteration", "8", "--num-generations", "4", "--minibatch-size", "16",
                       "--max-new-tokens", "6", "--learning-rate", "1e-3", "--eval-every", "1", "--device", "cpu",
                       "--no-progress"]) == 0
    info = read_info(out)
    assert info["stage"] == "grpo" and info["rewards"] == ["reward_model", "reward_fn_gold_plus_bonus"]
    rows = log_rows(tmp_path)
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        # the total is the weighted sum of the sources; every prompt is in every rollout, so
        # the function's mean carries the mean bonus (3.5) exactly, plus the utility in [0, 1]
        assert r["reward"] == pytest.approx(r["reward_model"] + 0.5 * r["reward_fn_gold_plus_bonus"], abs=1e-5)
        assert 3.5 <= r["reward_fn_gold_plus_bonus"] <= 4.5
        # the trainer's own model sampled: the importance ratio is exactly 1, the mismatch exactly 0
        assert (r["is_ratio_mean"], r["is_ratio_max"], r["is_capped_fraction"], r["mismatch_kl"]) == (1.0, 1.0, 0.0, 0.0)
    assert train_rows[0]["kl"] == 0.0 and train_rows[1]["kl"] != 0.0  # the first rollout is the reference's own
    # checkpoint selection: the best held-out reward - kl_coef * KL among the four evaluations
    evals = [r for r in rows if "eval_objective" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    best = max(evals, key=lambda r: r["eval_objective"])
    assert info["metrics"]["selected_iteration"] == best["step"] == info["selected_iteration"]
    for r in evals:
        assert r["eval_objective"] == pytest.approx(r["eval_score"] - 0.04 * r["eval_kl"])

    prompt = "sort the numbers: 3 1 2\nanswer:"
    srv = ServerThread(ServeConfig(policy=str(out), port=0, device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            reply = c.generate(prompt, max_new_tokens=5, ignore_eos=True)
        assert list(reply.completions[0].token_ids) == hf_greedy(out, prompt)
    finally:
        srv.stop()


def test_published_policy_is_the_selected_iteration(setup, tmp_path):
    """Selection publishes the weights of the best evaluation: the same run stopped at that
    iteration (without selection) publishes the same weights."""
    kwargs = dict(reward_model=str(setup["reward"]), eval_prompts_file=str(setup["eval"]), eval_every=1,
                  learning_rate=3e-3, num_iterations=4)
    metrics = train_grpo(GRPOConfig(**args(setup, tmp_path, "sel", **kwargs)))
    selected = metrics["selected_iteration"]
    rows = [r for r in log_rows(tmp_path, "sel") if "eval_objective" in r]
    assert selected == max(rows, key=lambda r: r["eval_objective"])["step"]
    if selected == 0:
        reference = setup["policy"]
    else:
        train_grpo(GRPOConfig(**args(setup, tmp_path, "stop", **{**kwargs, "num_iterations": selected},
                                     select_best=False)))
        reference = tmp_path / "stop"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "sel").state_dict()
    want = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    if selected != 4:  # the last iteration's weights were not published
        last = train_grpo(GRPOConfig(**args(setup, tmp_path, "last", **kwargs, select_best=False)))
        assert last["iterations"] == 4
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "last").state_dict()
        assert any(not torch.equal(got[k], final[k]) for k in want)


def test_rloo_with_a_reward_server_scores_as_the_reward_model_in_process(setup, tmp_path):
    """The server's Reward.Score and the in-process reward model, weighted +1 and -1, cancel."""
    from rlhfkit.server.app import ServeConfig, ServerThread

    srv = ServerThread(ServeConfig(policy=str(setup["policy"]), reward=str(setup["reward"]), port=0,
                                   device="cpu")).wait_loaded()
    try:
        metrics = train_rloo(RLOOConfig(**args(setup, tmp_path, reward_model=str(setup["reward"]),
                                               reward_server=srv.address, reward_weights=[1.0, -1.0])))
    finally:
        srv.stop()
    assert read_info(tmp_path / "out")["stage"] == "rloo" and metrics["iterations"] == 2
    for r in log_rows(tmp_path):
        assert abs(r["reward_model"]) > 1e-3
        assert r["reward_server"] == pytest.approx(r["reward_model"], abs=1e-5)
        assert abs(r["reward"]) < 1e-5

    from rlhfkit.clients import Client  # the RLOO checkpoint serves, greedy as transformers decodes it

    prompt = "reverse the words: cat dog\nanswer:"
    srv = ServerThread(ServeConfig(policy=str(tmp_path / "out"), port=0, device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            reply = c.generate(prompt, max_new_tokens=5, ignore_eos=True)
        assert list(reply.completions[0].token_ids) == hf_greedy(tmp_path / "out", prompt)
    finally:
        srv.stop()


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "token-sum"])
def test_micro_batches_accumulate_to_the_full_step(setup, tmp_path, aggregation):
    """Dr. GRPO's options and the unbiased k3 among them: in float64, micro-batches of 2
    responses give the weights of the whole minibatch at once."""
    kwargs = dict(reward_fn=[f"{setup['reward_fn']}:gold_plus_bonus"], reward_model=str(setup["reward"]),
                  dtype="float64", loss_aggregation=aggregation, scale_rewards=aggregation != "token-sum",
                  kl_estimator="k3_unbiased", kl_coef=0.5, ppo_epochs=2, minibatch_size=8)
    train_grpo(GRPOConfig(**args(setup, tmp_path, "whole", **kwargs)))
    train_grpo(GRPOConfig(**args(setup, tmp_path, "micro", micro_batch_size=2, **kwargs)))
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole", dtype=torch.float64).state_dict()
    micro = AutoModelForCausalLM.from_pretrained(tmp_path / "micro", dtype=torch.float64).state_dict()
    assert max((whole[k] - micro[k]).abs().max().item() for k in whole) < 1e-10
    base = AutoModelForCausalLM.from_pretrained(setup["policy"], dtype=torch.float64).state_dict()
    assert max((whole[k] - base[k]).abs().max().item() for k in whole) > 1e-4  # it trained
    assert all("kl_loss" in r for r in log_rows(tmp_path, "whole"))


@pytest.mark.parametrize("bad, message", [
    (dict(num_generations=1), "num_generations must be >= 2"),
    (dict(minibatch_size=6), "minibatch_size must be 0 (the whole rollout) or a multiple of num_generations (4)"),
    (dict(kl_estimator="k1", kl_in="loss"), "k1 has no expected gradient as a loss term"),
    (dict(kl_estimator="k3_unbiased", kl_in="reward"), "k3_unbiased is a loss term"),
    (dict(reward_model=None), "no reward source"),
    (dict(reward_weights=[1.0, 2.0]), "reward_weights: 2 given for 1 reward sources"),
    (dict(reward_fn=["rewards.py"]), "reward_fn must be module:function"),
    (dict(is_cap=0.5), "is_cap must be >= 1"),
    (dict(rollout_engine="sglang"), "rollout_engine must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_bad_options_name_the_field(setup, tmp_path, bad, message):
    with pytest.raises(ValueError) as info:
        GRPOConfig(**args(setup, tmp_path, **{"reward_model": str(setup["reward"]), **bad}))
    assert message in str(info.value)


def test_bad_reward_functions_say_what_is_wrong(setup, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"reward_fn_wrong_count returned 1 scores for 16 completions"):
        train_grpo(GRPOConfig(**args(setup, tmp_path, reward_fn=[f"{setup['reward_fn']}:wrong_count"])))
    with pytest.raises(ValueError, match="has no function 'missing'"):
        train_grpo(GRPOConfig(**args(setup, tmp_path, reward_fn=[f"{setup['reward_fn']}:missing"])))
    with pytest.raises(SystemExit):  # the CLI words the config's error for a person
        train_main(["grpo", "--model", str(setup["policy"]), "--prompts-file", str(setup["prompts"]),
                    "--output-dir", str(tmp_path / "x")])
    assert "no reward source: give --reward-model, --reward-server or --reward-fn" in capsys.readouterr().err


def test_rewards_of_several_sources_add_up_with_their_weights(tmp_path):
    """Two functions of one name (in two files) are two sources, each with its weight."""
    from rlhfkit.training.rewards import Rewards

    (tmp_path / "one.py").write_text("def reward(prompts, completions, **columns):\n    return [1.0] * len(prompts)\n")
    (tmp_path / "ten.py").write_text("def reward(prompts, completions, **columns):\n    return [10.0] * len(prompts)\n")

    options = GRPOConfig(model="m", prompts_file="p", output_dir="o",
                         reward_fn=[f"{tmp_path / 'one.py'}:reward", f"{tmp_path / 'ten.py'}:reward"],
                         reward_weights=[2.0, -0.5])
    rewards = Rewards(options)
    total, parts = rewards(["a", "b"], ["x", "y"])
    assert rewards.names == ["reward_fn_reward", "reward_fn_reward_2"]
    assert total.tolist() == [2.0 * 1 - 0.5 * 10] * 2 and parts["reward_fn_reward_2"].tolist() == [10.0, 10.0]


def test_no_kl_term_still_evaluates_the_kl(setup, tmp_path):
    """kl_coef 0 trains without a KL term (GRPO's is in the loss: no kl_loss), and with held-out
    prompts the reference is loaded all the same: the rollouts' and the evaluations' KL are
    measured (checkpoint selection and the over-optimisation curves read them)."""
    metrics = train_grpo(GRPOConfig(**args(setup, tmp_path, reward_model=str(setup["reward"]), kl_coef=0.0,
                                           num_iterations=3, eval_prompts_file=str(setup["eval"]))))
    assert metrics["eval_kl_start"] == 0.0 and metrics["final_eval_kl"] != 0.0
    assert not any(k.startswith("final_") and k.endswith("_start") for k in metrics)
    rows = [r for r in log_rows(tmp_path) if "reward" in r]
    assert all("kl_loss" not in r for r in rows) and rows[0]["kl"] == 0.0 and rows[-1]["kl"] != 0.0
