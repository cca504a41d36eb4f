"""Model references as `vllm serve` and `from_pretrained` take them: a local directory or a
Hugging Face Hub id, resolved through the Hub cache (rlhfkit.hf.resolve_model).

Each test lays out a cache by hand in a temporary HF_HOME, the way huggingface_hub writes
one (models--ORG--NAME/blobs, refs/<branch or tag>, snapshots/<commit>/<file> -> blob), and
sets HF_HUB_OFFLINE=1: nothing here may reach the network.
"""

import hashlib
import json
import os
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.clients import Client
from rlhfkit.hf import hub_snapshot, resolve_model
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.models import load_checkpoint
from rlhfkit.training.tiny import make_tiny_checkpoint

PROMPT = "the quick cat and the slow dog"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in a fresh HF_HOME, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    return cache


def put_in_cache(cache, repo_id, src, refs=("main",), meta=None):
    """Add the files of checkpoint directory `src` (plus an rlhfkit.json from `meta`) to the
    cache as a commit of `repo_id`, and point `refs` at it (atomically, as a download does)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    if meta is not None:
        files["rlhfkit.json"] = json.dumps(meta).encode()
    commit = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        tmp = repo / "refs" / f".{ref}.tmp"
        tmp.write_text(commit)
        os.replace(tmp, repo / "refs" / ref)
    return snapshot


@pytest.fixture()
def checkpoints(tmp_path, tiny_tokenizer):
    root = tmp_path / "src"
    return {
        "policy-a": make_tiny_checkpoint(root / "policy-a", "policy", tiny_tokenizer, seed=0),
        "policy-b": make_tiny_checkpoint(root / "policy-b", "policy", tiny_tokenizer, seed=5),
        "reward": make_tiny_checkpoint(root / "reward", "reward", tiny_tokenizer, seed=1),
    }


def greedy(path, prompt, n=12):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


# ---- resolve_model ---------------------------------------------------------------------


def test_a_local_directory_is_used_as_it_is(hub, checkpoints):
    d = checkpoints["policy-a"]
    assert resolve_model(str(d)) == d
    assert resolve_model(str(d), revision="v2") == d  # a revision applies to Hub ids only


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(hub, checkpoints):
    a = put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-a"], refs=("main", "v1"))
    b = put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-b"], refs=("main",))
    assert resolve_model("tiny-org/tiny-llama") == b  # main moved to the newer commit
    assert resolve_model("tiny-org/tiny-llama", revision="main") == b
    assert resolve_model("tiny-org/tiny-llama", revision="v1") == a  # a tag
    assert resolve_model("tiny-org/tiny-llama", revision=a.name) == a  # a commit
    assert hub_snapshot(b) == ("tiny-org/tiny-llama", b.name)
    assert hub_snapshot(checkpoints["policy-a"]) is None


def test_hf_hub_cache_takes_precedence_over_hf_home(hub, checkpoints, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    snap = put_in_cache(other, "tiny-org/tiny-llama", checkpoints["policy-a"])
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_model("tiny-org/tiny-llama") == snap


def test_errors_say_what_to_do(hub, checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("tiny-org/not-downloaded")
    msg = str(e.value)
    assert "not a local directory and not in the Hugging Face cache" in msg
    assert "`hf download tiny-org/not-downloaded`" in msg and "unset HF_HUB_OFFLINE" in msg
    put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-a"])
    with pytest.raises(FileNotFoundError, match=r"--revision v9` or unset HF_HUB_OFFLINE"):
        resolve_model("tiny-org/tiny-llama", revision="v9")
    with pytest.raises(FileNotFoundError, match="no such directory$"):
        resolve_model(str(tmp_path / "nope"))  # written as a path: never looked up on the Hub
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        resolve_model("bad repo id!")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model(str(checkpoints["policy-a"] / "config.json"))


def test_load_checkpoint_takes_a_hub_id(hub, checkpoints):
    snap = put_in_cache(hub, "tiny-org/tiny-rm", checkpoints["reward"])
    rm = load_checkpoint("tiny-org/tiny-rm", "reward", device="cpu")
    assert rm.path == snap and rm.kind == "reward"
    assert rm.version == f"tiny-rm-{snap.name[:12]}"


# ---- the server ------------------------------------------------------------------------


def test_serve_hub_ids_from_the_cache_with_lineage_and_hot_reload(hub, checkpoints, tmp_path):
    meta = {"stage": "sft", "parent": "", "base_model": "tiny-org/base", "created_at": "2025-01-01T00:00:00+00:00"}
    a = put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-a"], meta=meta)
    rm = put_in_cache(hub, "tiny-org/tiny-rm", checkpoints["reward"])
    srv = ServerThread(ServeConfig(policy="tiny-org/tiny-llama", reward="tiny-org/tiny-rm", port=0, device="cpu",
                                   reload_interval=0.1, feedback_db=f"sqlite:///{tmp_path / 'fb.db'}")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            resp = c.generate(PROMPT, max_new_tokens=12)
            assert list(resp.completions[0].token_ids) == greedy(a, PROMPT)
            assert resp.model_version == f"policy@tiny-llama-{a.name[:12]}-20250101000000"
            models = {m.name: m for m in c.list_models()}
            assert models["policy"].path == str(a) and models["reward"].path == str(rm)
            assert (models["policy"].stage, models["policy"].base_model) == ("sft", "tiny-org/base")
            assert len(c.score([(PROMPT, " is red")])) == 1

            # A newer commit lands in the cache (`hf download` while serving): main moves, and
            # the server loads it like a republished directory, with its lineage.
            b = put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-b"],
                             meta={**meta, "stage": "ppo", "parent": a.name, "created_at": "2025-01-02T00:00:00+00:00"})
            deadline = time.monotonic() + 30
            while c.generate(PROMPT, max_new_tokens=1).model_version != f"policy@tiny-llama-{b.name[:12]}-20250102000000":
                assert time.monotonic() < deadline, "the new snapshot was not loaded"
                time.sleep(0.1)
            assert list(c.generate(PROMPT, max_new_tokens=12).completions[0].token_ids) == greedy(b, PROMPT)
            m = {m.name: m for m in c.list_models()}["policy"]
            assert (m.path, m.stage, m.parent) == (str(b), "ppo", a.name)

            # The cache is removed under the running server: it keeps serving what it has.
            shutil.rmtree(hub / "models--tiny-org--tiny-llama")
            time.sleep(0.3)
            assert c.generate(PROMPT, max_new_tokens=1).model_version.startswith(f"policy@tiny-llama-{b.name[:12]}")
    finally:
        srv.stop()


def test_serve_a_pinned_revision(hub, checkpoints, tmp_path):
    a = put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-a"], refs=("main", "v1"))
    put_in_cache(hub, "tiny-org/tiny-llama", checkpoints["policy-b"], refs=("main",))
    srv = ServerThread(ServeConfig(policy="tiny-org/tiny-llama", revision="v1", port=0, device="cpu",
                                   reload_interval=0, feedback_db=f"sqlite:///{tmp_path / 'fb.db'}")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            assert {m.name: m for m in c.list_models()}["policy"].path == str(a)
    finally:
        srv.stop()


def test_serve_refuses_a_model_missing_from_the_cache_offline(hub, tmp_path):
    srv = ServerThread(ServeConfig(policy="Qwen/Qwen2.5-0.5B-Instruct", port=0, device="cpu",
                                   feedback_db=f"sqlite:///{tmp_path / 'fb.db'}"))
    try:
        with pytest.raises(FileNotFoundError) as e:
            srv.wait_loaded()
        assert str(e.value).startswith("--policy Qwen/Qwen2.5-0.5B-Instruct: not a local directory and not in the "
                                       "Hugging Face cache")
        assert "`hf download Qwen/Qwen2.5-0.5B-Instruct`" in str(e.value)
    finally:
        srv.stop()


def test_revision_does_not_apply_to_a_store(tmp_path):
    with pytest.raises(ValueError, match="--revision applies to"):
        ServeConfig(store=str(tmp_path), revision="v1")


def test_trainers_take_a_hub_id_and_a_revision_from_the_cache(hub, checkpoints, tmp_path):
    """`rlhfkit train sft|dpo --model ORG/NAME --revision R` offline: trained from the cached
    snapshot of that revision (the other revision's weights would give another start), with
    the Hub id as the checkpoint's parent."""
    from rlhfkit.training import task
    from rlhfkit.training.checkpoint import read_info
    from rlhfkit.training.cli import main as train_main
    from rlhfkit.training.data import write_jsonl

    put_in_cache(hub, "org/tiny", checkpoints["policy-a"], refs=("main",))
    put_in_cache(hub, "org/tiny", checkpoints["policy-b"], refs=("v2",))
    sft = write_jsonl(tmp_path / "sft.jsonl", task.sft_records(8, seed=1))
    run = ["--device", "cpu", "--no-progress", "--max-steps", "1", "--batch-size", "4", "--learning-rate", "1e-9"]
    for revision, source in (("v2", "policy-b"), (None, "policy-a")):
        out = tmp_path / f"sft-{revision}"
        assert train_main(["sft", "--model", "org/tiny", "--train-file", str(sft), "--output-dir", str(out), *run]
                          + (["--revision", revision] if revision else [])) == 0
        assert read_info(out)["parent"] == "org/tiny"
        trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
        start = AutoModelForCausalLM.from_pretrained(checkpoints[source]).state_dict()
        assert all(torch.allclose(trained[k], start[k], atol=1e-6) for k in start)  # lr 1e-9: the start, unchanged
    prefs = write_jsonl(tmp_path / "prefs.jsonl", task.preference_records(4, seed=2))
    assert train_main(["dpo", "--model", "org/tiny", "--train-file", str(prefs), "--output-dir", str(tmp_path / "dpo"),
                       *run]) == 0
    with pytest.raises(FileNotFoundError, match="hf download org/missing"):
        train_main(["sft", "--model", "org/missing", "--train-file", str(sft), "--output-dir", str(tmp_path / "x"),
                    *run])
