"""The bundled task, its annotator, and the JSONL readers' errors."""

import json
import random

import pytest

from rlhfkit.training import task
from rlhfkit.training.data import DataError, fingerprint_files, read_jsonl, write_jsonl


def test_examples_and_answers_by_hand():
    assert task.Example("sort", ("7", "3", "9", "1")).prompt == "sort the numbers: 7 3 9 1\nanswer:"
    assert task.Example("sort", ("7", "3", "9", "1")).answer == " 1 3 7 9"
    assert task.Example("sort", ("10", "9")).answer == " 9 10"  # numeric, not string, order
    assert task.Example("reverse", ("cat", "dog", "tree")).answer == " tree dog cat"
    assert task.Example("count", ("cat", "cat")).answer == " 2"
    e = task.Example("reverse", ("cat", "dog"))
    assert task.parse_prompt(e.prompt) == e
    with pytest.raises(ValueError):
        task.parse_prompt("what is this")


def test_utility_by_hand():
    p = task.Example("sort", ("3", "1", "2")).prompt
    assert task.utility(p, " 1 2 3") == 1.0
    assert task.utility(p, " 2 1 3") == pytest.approx(1 / 3)
    assert task.utility(p, " 1 2 3 3") == pytest.approx(3 / 4)  # extra item costs
    assert task.utility(p, " 1 2") == pytest.approx(2 / 3)
    assert task.utility(p, "") == 0.0
    c = task.Example("count", ("a", "b", "c", "d")).prompt
    assert task.utility(c, " 4") == 1.0
    assert task.utility(c, " 3") == pytest.approx(0.75)
    assert task.utility(c, " four") == 0.0
    # chatter before the answer costs 30%; the longest phrase is stripped, and only once
    assert task.utility(p, " sure the answer is 1 2 3") == pytest.approx(0.7)
    assert task.utility(p, " ok so 2 1 3") == pytest.approx(0.7 / 3)
    assert task.utility(p, " sure sure 1 2 3") == 0.0  # a second "sure" is an item, and a wrong one
    assert task.utility(c, " the answer is 4") == pytest.approx(0.7)
    assert task.utility(p, " 1 2 3 sure") == pytest.approx(3 / 4)  # chatter after the answer is a wrong item


def test_demonstrations_are_imperfect_at_the_stated_rate():
    records = task.sft_records(2000, seed=3, error_rate=0.2)
    wrong = sum(task.utility(r["prompt"], r["completion"]) < 1.0 for r in records)
    # a corruption can occasionally leave the answer right (swapping equal numbers)
    assert 0.15 < wrong / len(records) < 0.25
    assert all(task.utility(r["prompt"], r["completion"]) == 1.0 for r in task.sft_records(200, 4, error_rate=0.0))


def test_demonstrators_chatter_at_the_stated_rate():
    records = task.sft_records(2000, seed=3, error_rate=0.0, chatter_rate=0.6)
    chatty = [task.strip_chatter(r["completion"].split())[0] for r in records]
    assert 0.56 < sum(chatty) / len(chatty) < 0.64
    for r, is_chatty in zip(records, chatty):  # chatty demonstrations are right, and worth 0.7
        assert task.utility(r["prompt"], r["completion"]) == pytest.approx(0.7 if is_chatty else 1.0)
    assert not any(task.strip_chatter(r["completion"].split())[0] for r in task.sft_records(200, 4))


def test_annotator_is_noisy_like_bradley_terry():
    prompt = task.Example("sort", ("3", "1", "2")).prompt
    rng = random.Random(0)
    # utilities 1 and 2/3: P(first) = σ((1/3) / 0.1) = 0.966
    wins = sum(task.annotator_prefers_first(prompt, " 1 2 3", " 1 3 3", rng, 0.1) for _ in range(4000))
    assert wins / 4000 == pytest.approx(1 / (1 + 2.718281828 ** (-10 / 3)), abs=0.015)
    assert all(task.annotator_prefers_first(prompt, " 1 2 3", " 1 3 3", rng, 0.0) for _ in range(100))


def test_preference_and_ranking_records_mostly_agree_with_utility():
    prefs = task.preference_records(500, seed=1, temperature=0.1)
    agree = [task.utility(r["prompt"], r["chosen"]) >= task.utility(r["prompt"], r["rejected"]) for r in prefs]
    assert 0.8 < sum(agree) / len(agree) < 1.0  # noisy, but informative
    assert all(r["chosen"] != r["rejected"] for r in prefs)
    exact = task.preference_records(200, seed=2, temperature=0.0)
    assert all(task.utility(r["prompt"], r["chosen"]) >= task.utility(r["prompt"], r["rejected"]) for r in exact)
    rankings = task.ranking_records(100, k=4, seed=1, temperature=0.0)
    for r in rankings:
        u = [task.utility(r["prompt"], x) for x in r["responses"]]
        assert u == sorted(u, reverse=True) and 2 <= len(u) <= 4


def test_write_task_data_and_read_back(tmp_path):
    files = task.write_task_data(tmp_path, n_sft=20, n_pairs=10, n_rankings=5, n_prompts=7, n_eval=3)
    assert len(read_jsonl(files["sft"], "sft")) == 20
    assert len(read_jsonl(files["preferences"], "preferences")) == 10
    assert len(read_jsonl(files["rankings"], "rankings")) == 5
    assert len(read_jsonl(files["prompts"], "prompts")) == 7
    again = task.write_task_data(tmp_path / "again", n_sft=20, n_pairs=10, n_rankings=5, n_prompts=7, n_eval=3)
    assert fingerprint_files([files["sft"]]) == fingerprint_files([again["sft"]])  # deterministic
    assert fingerprint_files([files["sft"]]) != fingerprint_files([files["sft_eval"]])


@pytest.mark.parametrize("line,fmt,message", [
    ('{"prompt": "p"}', "sft", "missing key 'completion'"),
    ('{"prompt": "p", "completion": 3}', "sft", "'completion' must be a string"),
    ('{"prompt": "p", "chosen": "a"', "preferences", "not valid JSON"),
    ('["p", "a"]', "preferences", "expected a JSON object"),
    ('{"prompt": "p", "responses": ["a"]}', "rankings", "at least two"),
    ('{"prompt": "p", "responses": "a b"}', "rankings", "list of strings"),
    ('{"prompt": ""}', "prompts", "'prompt' is empty"),
])
def test_readers_name_file_and_line(tmp_path, line, fmt, message):
    path = tmp_path / "data.jsonl"
    good = {"sft": {"prompt": "p", "completion": "c"}, "preferences": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "rankings": {"prompt": "p", "responses": ["a", "b"]}, "prompts": {"prompt": "p"}}[fmt]
    path.write_text(json.dumps(good) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, fmt)
    assert f"{path}:3:" in str(info.value) and message in str(info.value)


def test_reader_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl", "sft")
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl", "sft")


def test_data_command_writes_every_format(tmp_path, capsys):
    from rlhfkit.training.cli import main as train_main

    assert train_main(["data", "--output-dir", str(tmp_path), "--n-sft", "5", "--n-pairs", "4", "--n-rankings", "3",
                       "--n-prompts", "2", "--n-eval", "1", "--temperature", "0"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert len(read_jsonl(written["sft"], "sft")) == 5 and len(read_jsonl(written["prompts"], "prompts")) == 2
    prefs = read_jsonl(written["preferences"], "preferences")
    assert all(task.utility(r["prompt"], r["chosen"]) >= task.utility(r["prompt"], r["rejected"]) for r in prefs)
    with pytest.raises(SystemExit):
        train_main(["data", "--output-dir", str(tmp_path), "--error-rate", "1.5"])
