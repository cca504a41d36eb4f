"""The trainers at real-model scale, on tiny models: LoRA (merged checkpoints that equal the
base with the adapter applied in transformers and serve over gRPC), bfloat16 and gradient
checkpointing against float32 / no checkpointing on the first step, and runs killed with
SIGKILL after their second save that resume to the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.dpo import DPOConfig, train_dpo
from rlhfkit.training.ppo import PPOConfig, train_ppo
from rlhfkit.training.rm import RMConfig, train_rm
from rlhfkit.training.sft import SFTConfig, train_sft
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

LORA = dict(lora_r=4, lora_alpha=8.0)
# peft 0.21 reads transformers' deprecated is_gradient_checkpointing (not this project's call)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    tok = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    data = {
        "sft": write_jsonl(root / "sft.jsonl", task.sft_records(12, seed=1)),
        "prefs": write_jsonl(root / "prefs.jsonl", task.preference_records(12, seed=2)),
        "prompts": write_jsonl(root / "prompts.jsonl", task.prompt_records(8, seed=3)),
    }
    return {"root": root, "policy": make_tiny_checkpoint(root / "policy", "policy", tok),
            "reward": make_tiny_checkpoint(root / "reward", "reward", tok, seed=1), **data}


def common(tmp_path, name, **kwargs):
    return dict(output_dir=str(tmp_path / name), log_dir=str(tmp_path / f"log-{name}"), progress=False, device="cpu",
                **kwargs)


def ppo_args(setup, **kwargs):
    return dict(model=str(setup["policy"]), reward_model=str(setup["reward"]), prompts_file=str(setup["prompts"]),
                rollout_batch_size=4, minibatch_size=2, max_new_tokens=4, learning_rate=1e-3, **kwargs)


# ---------------------------------------------------------------- LoRA

def assert_merged_equals_adapter(out, base, seq_cls=False):
    """The published (merged) checkpoint's logits equal the base model with the saved
    adapter applied by peft, and the adapter actually changed the model."""
    import peft

    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    info = read_info(out)
    assert info["adapter"] == "adapter" and (out / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 17, 9, 33, 2, 41]])
    merged = cls.from_pretrained(out).eval()
    adapted = peft.PeftModel.from_pretrained(cls.from_pretrained(base, **({"num_labels": 1} if seq_cls else {})),
                                             out / "adapter").eval()
    plain = cls.from_pretrained(base, **({"num_labels": 1} if seq_cls else {})).eval()
    with torch.no_grad():
        got, want, before = merged(ids).logits, adapted(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if not seq_cls:  # the RM's random score head makes any comparison with the base moot
        assert (got - before).abs().max() > 1e-3


def test_lora_sft_dpo_rm_publish_merged_checkpoints(setup, tmp_path):
    sft = train_sft(SFTConfig(**common(tmp_path, "sft", model=str(setup["policy"]), train_file=str(setup["sft"]),
                                       batch_size=4, max_steps=4, learning_rate=1e-2, **LORA)))
    assert_merged_equals_adapter(tmp_path / "sft", setup["policy"])
    dpo = train_dpo(DPOConfig(**common(tmp_path, "dpo", model=str(setup["policy"]), train_file=str(setup["prefs"]),
                                       batch_size=4, max_steps=3, learning_rate=1e-2, **LORA)))
    assert_merged_equals_adapter(tmp_path / "dpo", setup["policy"])
    assert dpo["steps"] == 3 and sft["steps"] == 4
    rm = train_rm(RMConfig(**common(tmp_path, "rm", model=str(setup["policy"]), train_file=str(setup["prefs"]),
                                    batch_size=4, max_steps=3, learning_rate=1e-2, log_every=1, **LORA)))
    assert_merged_equals_adapter(tmp_path / "rm", setup["policy"], seq_cls=True)
    assert rm["steps"] == 3
    # The reward model's score head trained (peft keeps it out of the adapter's freeze).
    adapter = load_file(tmp_path / "rm" / "adapter" / "adapter_model.safetensors")
    assert any("score" in k for k in adapter) and any("lora_A" in k for k in adapter)


def test_lora_in_bfloat16_publishes_a_float32_merge(setup, tmp_path):
    # The adapter trains over a bfloat16 copy of the base; the published merge is the adapter
    # over the float32 base, as peft applies it in float32.
    train_sft(SFTConfig(**common(tmp_path, "sft", model=str(setup["policy"]), train_file=str(setup["sft"]),
                                 batch_size=4, max_steps=3, learning_rate=1e-2, dtype="bfloat16", **LORA)))
    saved = load_file(tmp_path / "sft" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert_merged_equals_adapter(tmp_path / "sft", setup["policy"])


def test_lora_targets_outside_the_blocks_are_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="lora_target_modules: \\['lm_head'\\] are not linear layers"):
        train_sft(SFTConfig(**common(tmp_path, "sft", model=str(setup["policy"]), train_file=str(setup["sft"]),
                                     max_steps=1, lora_target_modules=["lm_head"], **LORA)))


def test_resume_with_other_options_names_them(setup, tmp_path):
    args = dict(model=str(setup["policy"]), train_file=str(setup["sft"]), batch_size=4, max_steps=4, save_every=2)
    train_sft(SFTConfig(**common(tmp_path, "sft", **args)))
    with pytest.raises(ValueError, match="batch_size: 4 then, 3 now"):
        train_sft(SFTConfig(**common(tmp_path, "sft", **{**args, "batch_size": 3}, resume=True, overwrite=True)))


def test_lora_dpo_reference_is_the_base(setup, tmp_path):
    # On the first step the policy (an adapter with B = 0) is its reference, the base, exactly:
    # the implicit rewards are 0 and the sigmoid loss is log 2.
    train_dpo(DPOConfig(**common(tmp_path, "dpo", model=str(setup["policy"]), train_file=str(setup["prefs"]),
                                 batch_size=12, max_steps=1, learning_rate=1e-2, log_every=1, **LORA)))
    [row] = [json.loads(line) for line in (tmp_path / "log-dpo" / "metrics.jsonl").read_text().splitlines()]
    assert row["reward_margin"] == 0.0 and row["loss"] == pytest.approx(0.6931472, abs=1e-6)


def test_lora_ppo_uses_the_base_as_reference_and_serves(setup, tmp_path):
    from rlhfkit.clients import Client, generate_request
    from rlhfkit.server.app import ServeConfig, ServerThread

    metrics = train_ppo(PPOConfig(**common(tmp_path, "ppo", **ppo_args(setup, num_iterations=2, **LORA))))
    rows = [json.loads(line) for line in (tmp_path / "log-ppo" / "metrics.jsonl").read_text().splitlines()]
    # The first rollout comes from the untrained adapter, whose B matrices are 0: the policy
    # is its reference exactly, so the KL is 0; after an update it is not.
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0 and metrics["iterations"] == 2
    assert_merged_equals_adapter(tmp_path / "ppo", setup["policy"])

    srv = ServerThread(ServeConfig(policy=str(tmp_path / "ppo"), port=0, device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            reply = c.generation.Generate(generate_request(prompt="sort the numbers: 3 1 2\nanswer:",
                                                           max_new_tokens=4), timeout=60)
            assert len(reply.completions[0].token_ids) >= 1
    finally:
        srv.stop()


def test_lora_rm_checkpoint_serves_scores(setup, tmp_path):
    from rlhfkit.clients import Client
    from rlhfkit.server.app import ServeConfig, ServerThread
    from rlhfkit.training.sequences import score_pairs
    from rlhfkit.v1 import reward_pb2
    from transformers import AutoTokenizer

    train_rm(RMConfig(**common(tmp_path, "rm", model=str(setup["policy"]), train_file=str(setup["prefs"]),
                               batch_size=4, max_steps=2, learning_rate=1e-2, **LORA)))
    srv = ServerThread(ServeConfig(policy=str(setup["policy"]), reward=str(tmp_path / "rm"), port=0,
                                   device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            served = c.reward.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(
                prompt="sort the numbers: 3 1 2\nanswer:", response=" 1 2 3")]), timeout=60).rewards[0]
    finally:
        srv.stop()
    # against the adapter applied by peft over the base, read the way training reads rewards
    import peft

    adapted = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(setup["policy"], num_labels=1), tmp_path / "rm" / "adapter")
    adapted.config.pad_token_id = AutoTokenizer.from_pretrained(setup["policy"]).pad_token_id
    with torch.no_grad():
        [want] = score_pairs(adapted.eval(), AutoTokenizer.from_pretrained(setup["policy"]),
                             [("sort the numbers: 3 1 2\nanswer:", " 1 2 3")], 256, "cpu").tolist()
    assert served == pytest.approx(want + read_info(tmp_path / "rm")["reward_bias"], abs=1e-4)


# ---------------------------------------------------------------- bfloat16 and gradient checkpointing

def first_step(setup, tmp_path, name, **kwargs):
    """The SFT trainer's first batch, through its own Run: (loss, {param: grad})."""
    from functools import partial

    from transformers import AutoTokenizer

    from rlhfkit.training import sft
    from rlhfkit.training.data import read_jsonl
    from rlhfkit.training.sequences import pad_id_of, tokenize_sft
    from rlhfkit.training.skeleton import LossModule, Run

    config = SFTConfig(**common(tmp_path, name, model=str(setup["policy"]), train_file=str(setup["sft"]),
                                batch_size=6, micro_batch_size=3, max_steps=1, **kwargs))
    run = Run(config, "sft")
    tok = AutoTokenizer.from_pretrained(setup["policy"])
    model = run.load(AutoModelForCausalLM, setup["policy"])
    run.prepare(LossModule(partial(sft.micro_loss, pad_id=pad_id_of(tok), device=run.device), model=model), 1)
    batch = tokenize_sft(tok, read_jsonl(setup["sft"], "sft"), 256)[:6]
    loss, _ = run.accumulate(batch)
    return loss, {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_matches_without(setup, tmp_path):
    loss, grads = first_step(setup, tmp_path, "plain")
    loss_gc, grads_gc = first_step(setup, tmp_path, "gc", gradient_checkpointing=True)
    assert loss_gc == pytest.approx(loss, rel=1e-6)  # the same forward, recomputed
    assert grads.keys() == grads_gc.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-7)


def test_bfloat16_first_step_matches_float32(setup, tmp_path):
    loss, grads = first_step(setup, tmp_path, "fp32")
    loss_bf, grads_bf = first_step(setup, tmp_path, "bf16", dtype="bfloat16")
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%): the loss (a mean of
    # ~100 log-probs) within 1%, each gradient within 5% of its norm and pointing the same way.
    assert loss_bf == pytest.approx(loss, rel=1e-2)
    assert grads.keys() == grads_bf.keys()
    for name in grads:
        a, b = grads[name].flatten(), grads_bf[name].flatten()
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-8, name
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.998, name
    # the trained weights stay float32 (the recipe: autocast over float32 weights)
    assert all(g.dtype == torch.float64 for g in grads_bf.values())


def test_bfloat16_and_checkpointing_train_every_stage(setup, tmp_path):
    opts = dict(dtype="bfloat16", gradient_checkpointing=True, max_steps=2, batch_size=4, learning_rate=1e-3)
    for name, (config_cls, train, args) in {
        "sft": (SFTConfig, train_sft, dict(model=str(setup["policy"]), train_file=str(setup["sft"]))),
        "rm": (RMConfig, train_rm, dict(model=str(setup["policy"]), train_file=str(setup["prefs"]))),
        "dpo": (DPOConfig, train_dpo, dict(model=str(setup["policy"]), train_file=str(setup["prefs"]))),
    }.items():
        metrics = train(config_cls(**common(tmp_path, name, **args, **opts)))
        assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"])), name
    metrics = train_ppo(PPOConfig(**common(tmp_path, "ppo", **ppo_args(setup, num_iterations=2, dtype="bfloat16",
                                                                       gradient_checkpointing=True))))
    assert metrics["iterations"] == 2
    saved = load_file(tmp_path / "sft" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # float32 weights published


# ---------------------------------------------------------------- save, kill, resume

def cli(stage: str, args: dict) -> list[str]:
    argv = [sys.executable, "-m", "rlhfkit.training.cli", stage]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process


def kill_after_second_save(argv: list[str], save_dir, output_dir) -> list[str]:
    """Start the run, SIGKILL it once its second save is complete; the saves it left."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list(save_dir.glob("step-*[0-9]"))) >= 2:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before its second save: " + proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not output_dir.exists()
    return sorted(p.name for p in save_dir.glob("step-*[0-9]"))


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_killed_run_resumes_to_the_uninterrupted_weights(setup, tmp_path, stage):
    if stage == "sft":
        args = dict(model=setup["policy"], train_file=setup["sft"], batch_size=4, max_steps=40, learning_rate=1e-2,
                    log_every=1, save_every=2)
    else:  # PPO-ptx with the adaptive KL controller: all the state a PPO run carries
        args = dict(ppo_args(setup, num_iterations=14, ptx_file=str(setup["sft"]), ptx_coef=0.5, kl_target=1.0,
                             kl_horizon=20), save_every=2)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(cli(stage, {**args, "output_dir": whole, "log_dir": tmp_path / "log-whole",
                                      "device": "cpu", "progress": False}), env=ENV, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    run = {**args, "output_dir": killed, "log_dir": tmp_path / "log-killed", "device": "cpu", "progress": False}
    saves = kill_after_second_save(cli(stage, run), tmp_path / "killed.saves", killed)
    assert len(saves) >= 2 and saves[0] != saves[-1]
    done = subprocess.run(cli(stage, {**run, "resume": True}), env=ENV, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # The resumed run's metrics continue the killed one's: every step once, the same values.
    rows = [json.loads(line) for line in (tmp_path / "log-killed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "log-whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for got, want in zip(rows, ref):
        for key in want.keys() - {"time"}:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)
    info_a, info_b = read_info(whole)["metrics"], read_info(killed)["metrics"]
    for key in info_a.keys() - {"seconds"}:
        assert info_b[key] == pytest.approx(info_a[key], rel=1e-5, abs=1e-7), key


def test_resume_without_a_save_says_what_to_do(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="--save-every"):
        train_sft(SFTConfig(**common(tmp_path, "sft", model=str(setup["policy"]), train_file=str(setup["sft"]),
                                     max_steps=2, resume=True)))


@pytest.mark.parametrize("bad, message", [
    (dict(lora_r=-1), "lora_r must be >= 0"),
    (dict(lora_r=4, lora_dropout=1.0), "lora_dropout in"),
    (dict(lora_target_modules=["q_proj"]), "lora_target_modules needs lora_r"),
    (dict(save_every=-2), "save_every must be >= 0"),
])
def test_bad_options_name_the_field(setup, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        SFTConfig(**common(tmp_path, "x", model="m", train_file="f", **bad))


def test_new_options_are_on_every_trainers_cli():
    from rlhfkit.training.cli import build_parser

    _, entries = build_parser()
    for stage in ("sft", "rm", "dpo", "ppo"):
        text = entries[stage][2].format_help()
        for flag in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules", "--dtype",
                     "--gradient-checkpointing", "--save-every", "--resume", "--fsdp"):
            assert flag in text, (stage, flag)
    assert "--batch-size" not in entries["ppo"][2].format_help()  # PPO's batches are its own


def test_dpo_scores_only_the_pairs_it_draws_and_resumes(setup, tmp_path):
    args = dict(model=str(setup["policy"]), train_file=str(setup["prefs"]), learning_rate=1e-2, log_every=1)
    one = train_dpo(DPOConfig(**common(tmp_path, "one", batch_size=4, max_steps=1, **args)))
    assert one["reference_pairs"] == 4 and one["train_pairs"] == 12
    # 12 pairs in batches of 5 for 4 steps: 5, 5, 2, then the next epoch's first 5: every pair
    whole = train_dpo(DPOConfig(**common(tmp_path, "whole", batch_size=5, max_steps=4, save_every=2, **args)))
    assert whole["reference_pairs"] == 12
    # Resumed from step 2 (a finished run keeps its saves), it scores only what steps 3-4 draw
    # and ends where the uninterrupted run ended.
    resumed = train_dpo(DPOConfig(**common(tmp_path, "whole", batch_size=5, max_steps=4, save_every=2, resume=True,
                                           overwrite=True, **args)))
    assert 5 <= resumed["reference_pairs"] <= 7  # the epoch's last 2 and the next epoch's first 5, distinct
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
