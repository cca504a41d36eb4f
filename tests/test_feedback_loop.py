"""The way back into training: votes -> `rlhfkit feedback export` -> `rlhfkit train rm` ->
the reward model prefers the responses people chose."""

import json

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.clients import Client
from rlhfkit.clients.cli import main as cli_main
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus

DECODE = dict(max_new_tokens=8, ignore_eos=True)


def server_scores(checkpoint, pairs):
    """Rewards read the way Reward.Score reads them: prompt + response, one text at a time."""
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return [model(**tok(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in pairs]


def test_votes_export_train_rm(tmp_path, tiny_tokenizer, tiny_policy_dir):
    other = make_tiny_checkpoint(tmp_path / "other", "policy", tiny_tokenizer, seed=11)
    db = tmp_path / "feedback.db"
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reference=str(other), port=0, device="cpu",
                                   feedback_db=f"sqlite:///{db}")).wait_loaded()
    prompts = sample_corpus()[:32]
    chosen_pairs = []
    try:
        with Client(srv.address, timeout=60) as c:
            for i, prompt in enumerate(prompts):
                # The annotator likes `policy`'s answers (greedy, so known in advance).
                liked = c.generate(prompt, model="policy", **DECODE).completions[0].text
                comp = c.create_comparison(prompt, models=("policy", "reference"), **DECODE)
                if comp.left == comp.right:
                    c.submit_vote(comp.comparison_id, "tie", "judge")
                    continue
                side = "left" if comp.left == liked else "right"
                vote = c.submit_vote(comp.comparison_id, side, "judge")
                assert getattr(vote, f"{side}_model") == "policy"
                disliked = comp.right if side == "left" else comp.left
                chosen_pairs.append((prompt, liked, disliked, vote.vote_id))
                if i % 8 == 0:  # ties and both-bad votes carry no preference: not exported
                    c.submit_vote(comp.comparison_id, "both_bad", "other-annotator")
    finally:
        srv.stop()
    assert len(chosen_pairs) >= 24

    prefs = tmp_path / "prefs.jsonl"
    assert cli_main(["feedback", "export", "--feedback-db", f"sqlite:///{db}", "--format", "trl",
                     "--out", str(prefs)]) == 0
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["vote_id"]) for r in records] == chosen_pairs
    assert {r["annotator_id"] for r in records} == {"judge"}

    out = tmp_path / "rm"
    assert train_main(["rm", "--model", str(tiny_policy_dir), "--train-file", str(prefs), "--output-dir", str(out),
                       "--max-steps", "24", "--batch-size", "8", "--learning-rate", "1e-3",
                       "--log-dir", str(tmp_path / "log"), "--no-progress"]) == 0
    chosen = server_scores(out, [(p, r) for p, r, _, _ in chosen_pairs])
    rejected = server_scores(out, [(p, r) for p, _, r, _ in chosen_pairs])
    accuracy = sum(a > b for a, b in zip(chosen, rejected)) / len(chosen_pairs)
    assert accuracy >= 0.9, f"the RM prefers the chosen response on {accuracy:.0%} of the voted pairs"
