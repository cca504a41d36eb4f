"""Tokens from the command line: `rlhfkit tokens add / list / remove`, and the CLI against a
real server with --auth-tokens over loopback (no token, RLHFKIT_TOKEN, --token, a role
without the right, the tokens file re-read while the server runs); the trainer's
--reward-server with a token."""

import asyncio
import json
import stat
import time
from dataclasses import dataclass

import grpc
import pytest

from rlhfkit.clients import AsyncClient, Client
from rlhfkit.clients.cli import main
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training.rewards import RewardOptions, Rewards, ServerRewards
from test_store import publish


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of an rlhfkit command run in process (sys.exit(message)
    is status 1 with the message on stderr, as Python's exit does it)."""
    message = ""
    try:
        status = main(list(argv))
    except SystemExit as e:
        status, message = (1, e.code) if isinstance(e.code, str) else (e.code or 0, "")
    out = capsys.readouterr()
    return status, out.out, out.err + message


def tokens_cli(capsys, *argv):
    return run_cli(capsys, "tokens", *argv)


def add(capsys, path, name, role) -> str:
    status, out, _ = tokens_cli(capsys, "add", name, "--role", role, "--file", str(path))
    assert status == 0
    return out.strip()


@dataclass(kw_only=True)
class _Base:
    def __post_init__(self):
        pass


@dataclass(kw_only=True)
class Options(RewardOptions, _Base):
    """RewardOptions alone, as the trainers' configs mix it in."""


# ---- rlhfkit tokens ---------------------------------------------------------------------


def test_tokens_add_list_remove(tmp_path, capsys):
    path = tmp_path / "tokens.json"
    token = add(capsys, path, "ann-7", "annotator")
    assert len(token) >= 32 and "\n" not in token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    admin = add(capsys, path, "ops", "admin")
    assert json.loads(path.read_text()) == {token: {"name": "ann-7", "role": "annotator"},
                                            admin: {"name": "ops", "role": "admin"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    status, out, err = tokens_cli(capsys, "list", "--file", str(path))
    assert status == 0 and out.splitlines() == ["ann-7\tannotator", "ops\tadmin"]
    status, out_json, err_json = tokens_cli(capsys, "list", "--file", str(path), "--json")
    assert json.loads(out_json) == [{"name": "ann-7", "role": "annotator"}, {"name": "ops", "role": "admin"}]
    for text in (out, err, out_json, err_json):  # listing never shows a token
        assert token not in text and admin not in text

    status, out, err = tokens_cli(capsys, "remove", "ann-7", "--file", str(path))
    assert status == 0 and token not in out + err
    assert list(json.loads(path.read_text()).values()) == [{"name": "ops", "role": "admin"}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    status, _, err = tokens_cli(capsys, "remove", "ann-7", "--file", str(path))
    assert status != 0 and "no token named 'ann-7'" in err


def test_tokens_errors(tmp_path, capsys):
    path = tmp_path / "tokens.json"
    status, _, err = tokens_cli(capsys, "add", "ann-7", "--role", "owner", "--file", str(path))
    assert status == 2 and "invalid choice: 'owner'" in err and not path.exists()
    status, _, err = tokens_cli(capsys, "add", "ann-7", "--file", str(path))
    assert status == 2 and "--role" in err
    status, _, err = tokens_cli(capsys, "add", "--role", "client", "--file", str(path))
    assert status == 2 and "NAME" in err
    status, _, err = tokens_cli(capsys, "list", "--file", str(tmp_path / "missing.json"))
    assert status != 0 and "missing.json" in err
    path.write_text('{"short": {"name": "x", "role": "client"}}')  # a file the server would refuse is not extended
    status, _, err = tokens_cli(capsys, "add", "ann-7", "--role", "client", "--file", str(path))
    assert status != 0 and "at least 16 characters" in err
    assert json.loads(path.read_text()) == {"short": {"name": "x", "role": "client"}}


# ---- the CLI against a server with --auth-tokens ------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """A --store server with tokens: sft-1 (policy until promoted), rm-1 and ppo-1."""
    tmp = tmp_path_factory.mktemp("auth-cli")
    store = tmp / "store"
    sft = publish(store, "sft-1", "sft", tiny_tokenizer, seed=0)
    publish(store, "rm-1", "rm", tiny_tokenizer, seed=1, parent=sft)
    publish(store, "ppo-1", "ppo", tiny_tokenizer, seed=2, parent=sft)
    path = tmp / "tokens.json"
    from rlhfkit.server.auth import add_token

    tokens = {"path": path, "client": add_token(str(path), "app-1", "client"),
              "admin": add_token(str(path), "ops", "admin")}
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0.2,
                                   auth_tokens=str(path), feedback_db=f"sqlite:///{tmp / 'feedback.db'}")).wait_loaded()
    yield {"server": srv, "address": srv.address, **tokens}
    srv.stop()


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("RLHFKIT_TOKEN", raising=False)


def test_no_token_says_what_to_do(setup, capsys):
    for argv in (["models"], ["generate", "the cat", "--max-new-tokens", "2"], ["score", "the cat", " sat"],
                 ["feedback", "leaderboard"]):
        status, out, message = run_cli(capsys, *argv, "--address", setup["address"])
        assert status != 0 and out == ""
        assert "UNAUTHENTICATED" in message and "--token" in message and "RLHFKIT_TOKEN" in message
    status, _, message = run_cli(capsys, "models", "--address", setup["address"], "--token", "wrong-token-0123456789")
    assert status != 0 and "UNAUTHENTICATED" in message and "does not accept the token of --token" in message


def test_the_token_from_the_environment_or_the_option(setup, capsys, monkeypatch):
    status, out, _ = run_cli(capsys, "models", "--address", setup["address"], "--token", setup["client"], "--json")
    assert status == 0 and {m["name"] for m in json.loads(out)} == {"sft-1", "rm-1", "ppo-1"}
    monkeypatch.setenv("RLHFKIT_TOKEN", setup["client"])
    status, out, _ = run_cli(capsys, "generate", "the cat", "--address", setup["address"], "--max-new-tokens", "2",
                             "--json")
    assert status == 0 and json.loads(out)["completions"][0]["token_ids"]
    status, out, _ = run_cli(capsys, "score", "the cat", " sat", "--address", setup["address"], "--json")
    assert status == 0 and len(json.loads(out)["rewards"]) == 1
    status, out, _ = run_cli(capsys, "generate", "the cat", "--address", setup["address"], "--max-new-tokens", "2",
                             "--stream", "--json")
    assert status == 0 and out.strip()
    # --token wins over the environment
    status, _, message = run_cli(capsys, "models", "--address", setup["address"], "--token", "wrong-token-0123456789")
    assert status != 0 and "UNAUTHENTICATED" in message
    monkeypatch.setenv("RLHFKIT_TOKEN", "wrong-token-0123456789")
    status, _, message = run_cli(capsys, "models", "--address", setup["address"])
    assert status != 0 and "does not accept the token of RLHFKIT_TOKEN" in message


def test_async_client_sends_the_token_on_plaintext(setup):
    async def go(token):
        async with AsyncClient(setup["address"], timeout=60, token=token) as c:
            try:
                chunks = [ch async for ch in c.generate_stream("the cat", max_new_tokens=2, ignore_eos=True)]
                return len(await c.list_models()), len(chunks), None
            except grpc.aio.AioRpcError as e:
                return None, None, e.code()

    models, chunks, refusal = asyncio.run(go(setup["client"]))
    assert refusal is None and models == 3 and chunks >= 1
    assert asyncio.run(go(""))[2] == grpc.StatusCode.UNAUTHENTICATED


def test_the_chat_stops_on_an_access_error(setup, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    status, out, message = run_cli(capsys, "chat", "--address", setup["address"])
    assert status != 0 and "UNAUTHENTICATED" in message and "RLHFKIT_TOKEN" in message


def test_promote_needs_the_admin_role(setup, capsys):
    def policy():
        with Client(setup["address"], timeout=60, token=setup["admin"]) as c:
            return {r: m.name for m in c.list_models() for r in m.roles}["policy"]

    assert policy() == "ppo-1"
    status, _, message = run_cli(capsys, "models", "promote", "sft-1", "--role", "policy", "--address",
                                 setup["address"], "--token", setup["client"])
    assert status != 0 and "PERMISSION_DENIED" in message and "admin" in message
    assert "ask the server's admin for a token with a role that has it" in message
    assert policy() == "ppo-1"
    status, out, _ = run_cli(capsys, "models", "promote", "sft-1", "--role", "policy", "--address",
                             setup["address"], "--token", setup["admin"], "--json")
    assert status == 0 and "policy" in next(m["roles"] for m in json.loads(out) if m["name"] == "sft-1")
    assert policy() == "sft-1"
    run_cli(capsys, "models", "promote", "ppo-1", "--role", "policy", "--address", setup["address"],
            "--token", setup["admin"])
    assert policy() == "ppo-1"


def eventually(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the server did not pick up the changed tokens file"
        time.sleep(0.2)


def test_the_tokens_file_is_re_read_while_serving(setup, capsys):
    address, path = setup["address"], str(setup["path"])

    def works(token) -> bool:
        return run_cli(capsys, "models", "--address", address, "--token", token)[0] == 0

    new = add(capsys, path, "ann-9", "annotator")
    time.sleep(1.1)  # the server looks at the file at most once a second
    eventually(lambda: works(new))
    status, _, _ = tokens_cli(capsys, "remove", "ann-9", "--file", path)
    assert status == 0
    time.sleep(1.1)
    eventually(lambda: not works(new))
    assert works(setup["client"])  # the others still work


# ---- the trainer's --reward-server with a token --------------------------------------------


def test_server_rewards_with_a_token(setup, tmp_path, monkeypatch):
    pairs = (["the cat", "the dog"], [" sat", " ran"])
    with Client(setup["address"], timeout=60, token=setup["client"]) as c:
        want = c.score(list(zip(*pairs)))

    token_file = tmp_path / "token"
    token_file.write_text(setup["client"] + "\n")
    rewards = Rewards(Options(reward_server=setup["address"], reward_server_token_file=str(token_file)))
    try:
        total, parts = rewards(*pairs)
        assert total.tolist() == pytest.approx(want) and parts["reward_server"].tolist() == pytest.approx(want)
    finally:
        rewards.close()

    monkeypatch.setenv("RLHFKIT_TOKEN", setup["client"])  # the default
    source = ServerRewards(setup["address"])
    try:
        assert source(*pairs) == pytest.approx(want)
    finally:
        source.close()

    monkeypatch.delenv("RLHFKIT_TOKEN")
    source = ServerRewards(setup["address"])
    try:
        with pytest.raises(RuntimeError, match="UNAUTHENTICATED.*--reward-server-token-file FILE or set RLHFKIT_TOKEN"):
            source(*pairs)
    finally:
        source.close()

    with pytest.raises(ValueError, match="--reward-server-token-file .*missing: cannot read it"):
        Rewards(Options(reward_server=setup["address"], reward_server_token_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--reward-server-tls-ca .*missing.pem: cannot read it"):
        Rewards(Options(reward_server=setup["address"], reward_server_tls_ca=str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match="reward_server_token_file is for --reward-server"):
        Options(reward_fn=["x:y"], reward_server_token_file=str(token_file))
