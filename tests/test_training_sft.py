"""SFT, checkpoints and the generated CLI, end to end on a tiny random Llama."""

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.training import task
from rlhfkit.training.checkpoint import publish_checkpoint, read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.common import warmup_cosine
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.sequences import IGNORE, collate, sft_loss, tokenize_sft
from rlhfkit.training.sft import SFTConfig
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "policy", tokenizer=tokenizer)


def test_tokenize_masks_prompt_and_appends_eos(base):
    tok = AutoTokenizer.from_pretrained(base)
    [(ids, labels)] = tokenize_sft(tok, [{"prompt": "sort the numbers: 3 1\nanswer:", "completion": " 1 3"}], 256)
    n_prompt = len(tok("sort the numbers: 3 1\nanswer:")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == " 1 3"
    # truncation keeps what fits; a completion cut away entirely drops the example
    assert tokenize_sft(tok, [{"prompt": "sort the numbers: 3 1\nanswer:", "completion": " 1 3"}], n_prompt) == []


def test_sft_loss_equals_transformers_loss(base):
    # Reference: transformers' own shifted cross-entropy over the non-ignored labels.
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    records = task.sft_records(5, seed=7)
    batch = collate(tokenize_sft(tok, records, 256), tok.pad_token_id)
    ours, n = sft_loss(model, batch)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 0, 0.0) == pytest.approx(0.0)


def test_publish_is_atomic_and_records_lineage(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    out = publish_checkpoint(model, tok, tmp_path / "ckpt", stage="sft", parent=base,
                             data_fingerprint="sha256:x", metrics={"loss": 1.5})
    info = read_info(out)
    assert info["stage"] == "sft" and info["parent"] == str(base) and info["base_model"] == str(base)
    assert info["metrics"] == {"loss": 1.5} and info["data_fingerprint"] == "sha256:x" and info["created_at"]
    with pytest.raises(FileExistsError):
        publish_checkpoint(model, tok, out, stage="sft", parent=base)
    # a child inherits base_model from its parent's rlhfkit.json
    child = publish_checkpoint(model, tok, tmp_path / "child", stage="rm", parent=out)
    assert read_info(child)["base_model"] == str(base) and read_info(child)["parent"] == str(out)

    class Exploding(torch.nn.Module):
        def save_pretrained(self, path):
            (path / "half.bin").parent.mkdir(parents=True, exist_ok=True)
            (path / "half.bin").write_bytes(b"x")
            raise OSError("disk full")

    with pytest.raises(OSError):
        publish_checkpoint(Exploding(), tok, out, stage="sft", parent=base, overwrite=True)
    assert read_info(out)["metrics"] == {"loss": 1.5}  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child", "ckpt"]  # no temporary left behind


def test_cli_is_generated_from_the_config(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["sft", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(SFTConfig):
        assert "--" + f.name.replace("_", "-") in help_text
    assert "peak learning rate" in help_text
    with pytest.raises(SystemExit) as info:
        train_main(["sft", "--model", "m", "--train-file", "t", "--output-dir", "o", "--batch-size", "0"])
    assert info.value.code == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err


def hf_loss(checkpoint, records) -> float:
    """Mean completion-token NLL by transformers' own loss, one example at a time."""
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            p = tok(r["prompt"])["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + c])
            loss = model(input_ids=ids, labels=torch.tensor([[-100] * len(p) + c])).loss.item()
            total, count = total + loss * len(c), count + len(c)
    return total / count


def test_sft_end_to_end_through_the_cli(base, tmp_path, capsys):
    records = task.sft_records(8, seed=11, error_rate=0.0)
    train_file = write_jsonl(tmp_path / "sft.jsonl", records)
    out = tmp_path / "sft-ckpt"
    code = train_main(["sft", "--model", str(base), "--train-file", str(train_file), "--eval-file", str(train_file),
                       "--output-dir", str(out), "--max-steps", "30", "--batch-size", "8", "--learning-rate", "3e-3",
                       "--log-every", "5", "--eval-every", "10", "--log-dir", str(tmp_path / "log"), "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    before, after = hf_loss(base, records), hf_loss(out, records)
    assert after < 0.6 * before, (before, after)  # overfits 8 examples
    assert printed["eval_loss"] == pytest.approx(after, rel=1e-4)
    info = read_info(out)
    assert info["stage"] == "sft" and info["parent"] == str(base) and info["data_fingerprint"].startswith("sha256:")
    rows = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert all(math.isfinite(r["loss"]) for r in rows) and "eval_loss" in rows[1]
    assert (tmp_path / "log" / "curves.png").stat().st_size > 1000


def test_overwrite_replaces_in_place(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    out = publish_checkpoint(model, tok, tmp_path / "ckpt", stage="sft", parent=base, metrics={"v": 1})
    inode = out.stat().st_ino
    publish_checkpoint(model, tok, out, stage="ppo", parent=base, metrics={"v": 2}, overwrite=True)
    assert read_info(out)["metrics"] == {"v": 2} and read_info(out)["stage"] == "ppo"
    assert out.stat().st_ino != inode  # a new directory took the name
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old one is gone, no temporaries
    AutoModelForCausalLM.from_pretrained(out)


def trained_weights(train_fn, config_cls, tmp_path, name, **kwargs):
    from safetensors.torch import load_file

    out = tmp_path / name
    train_fn(config_cls(output_dir=str(out), max_steps=1, log_dir=str(tmp_path / f"log-{name}"), progress=False,
                        device="cpu", **kwargs))
    return load_file(out / "model.safetensors")


def assert_same_weights(a, b):
    # Adam's first step is lr * g / (|g| + eps), whose slope at g ~ 0 is lr / eps = 1e6: in
    # float32 the ~1e-10 summation-order noise of a gradient near 0 (micro-batches added in
    # another order) moves its weight by up to ~1e-4 (7.5e-5 seen on AMD EPYC). The callers
    # train in float64 (noise ~1e-19, so ~1e-13 here); a different step differs by ~lr.
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-5)


def test_micro_batches_accumulate_to_the_full_batch_step(base, tmp_path):
    # One optimizer step on 6 examples of uneven lengths: in one go, or as micro-batches of 4 + 2.
    from rlhfkit.training.sft import train_sft

    train_file = write_jsonl(tmp_path / "sft.jsonl", task.sft_records(6, seed=5))
    args = dict(model=str(base), train_file=str(train_file), batch_size=6, learning_rate=1e-2, warmup_steps=1,
                dtype="float64")
    whole = trained_weights(train_sft, SFTConfig, tmp_path, "whole", **args)
    micro = trained_weights(train_sft, SFTConfig, tmp_path, "micro", micro_batch_size=4, **args)
    assert_same_weights(whole, micro)
    moved = trained_weights(train_sft, SFTConfig, tmp_path, "other", **{**args, "learning_rate": 2e-2})
    with pytest.raises(AssertionError):  # the comparison can fail
        assert_same_weights(whole, moved)
