"""TLS and mutual TLS on the gRPC port, over real sockets on loopback, with certificates made
in the test (tests/tls_certs.py): a client that trusts the CA gets through, plaintext and a
client trusting another CA do not; with --tls-client-ca a client needs a certificate; the
token travels over TLS as call credentials; Client, AsyncClient and the CLI alike."""

import asyncio
import json

import grpc
import pytest

from rlhfkit.clients import AsyncClient, Client
from rlhfkit.clients.cli import main
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.auth import add_token
from tls_certs import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """Another CA's certificates: neither side trusts them."""
    return make_certs(tmp_path_factory.mktemp("other-certs"), ca_name="someone else's CA")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tls-tokens") / "tokens.json"
    return {"path": str(path), "client": add_token(str(path), "app-1", "client"),
            "admin": add_token(str(path), "ops", "admin")}


def start(tmp, policy, **tls):
    return ServerThread(ServeConfig(policy=str(policy), port=0, device="cpu", reload_interval=0,
                                    feedback_db=f"sqlite:///{tmp / 'feedback.db'}", **tls)).wait_loaded()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tiny_policy_dir, certs, tokens):
    """TLS (server certificate only) and tokens."""
    srv = start(tmp_path_factory.mktemp("tls"), tiny_policy_dir, tls_cert=certs["server_cert"],
                tls_key=certs["server_key"], auth_tokens=tokens["path"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, tiny_policy_dir, certs):
    """Mutual TLS, no tokens."""
    srv = start(tmp_path_factory.mktemp("mtls"), tiny_policy_dir, tls_cert=certs["server_cert"],
                tls_key=certs["server_key"], tls_client_ca=certs["ca"])
    yield srv
    srv.stop()


def localhost(server) -> str:
    return f"localhost:{server.server.port}"


def refused(client) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        client.health(timeout=10)
    return e.value.code()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_client_trusting_the_ca_gets_through(tls_server, certs, tokens, host):
    address = f"{host}:{tls_server.server.port}"
    with Client(address, timeout=60, tls_ca=certs["ca"], token=tokens["client"]) as c:
        assert c.health() == "SERVING"
        assert [m.role for m in c.list_models()] == ["policy"]
        resp = c.generate("the cat", max_new_tokens=3, ignore_eos=True)
        assert len(resp.completions[0].token_ids) == 3
        assert len(list(c.generate_stream("the cat", max_new_tokens=3, ignore_eos=True))) >= 1


def test_plaintext_to_the_tls_port_is_refused(tls_server, tokens):
    with Client(localhost(tls_server), token=tokens["client"]) as c:
        assert refused(c) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server, other_certs, tokens):
    with Client(localhost(tls_server), tls_ca=other_certs["ca"], token=tokens["client"]) as c:
        assert refused(c) == grpc.StatusCode.UNAVAILABLE
    with Client(localhost(tls_server), tls=True, token=tokens["client"]) as c:  # gRPC's default roots
        assert refused(c) == grpc.StatusCode.UNAVAILABLE


def test_tokens_over_tls(tls_server, certs, tokens):
    """The token is call credentials on a TLS channel: missing, wrong, role too low, all told."""
    with Client(localhost(tls_server), timeout=60, tls_ca=certs["ca"], token="") as c:
        assert c.health() == "SERVING"  # health is open
        with pytest.raises(grpc.RpcError) as e:
            c.list_models()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(localhost(tls_server), timeout=60, tls_ca=certs["ca"], token="not-a-known-token-0123456789") as c:
        with pytest.raises(grpc.RpcError) as e:
            c.list_models()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(localhost(tls_server), timeout=60, tls_ca=certs["ca"], token=tokens["client"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.set_role("policy", "policy")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with Client(localhost(tls_server), timeout=60, tls_ca=certs["ca"], token=tokens["admin"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.set_role("policy", "policy")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # allowed; this server has no --store


def test_token_from_the_environment_over_tls(tls_server, certs, tokens, monkeypatch):
    monkeypatch.setenv("RLHFKIT_TOKEN", tokens["client"] + "\n")  # as `$(cat token-file)` may leave it
    with Client(localhost(tls_server), timeout=60, tls_ca=certs["ca"]) as c:
        assert [m.role for m in c.list_models()] == ["policy"]


def test_async_client_over_tls_with_a_token(tls_server, certs, tokens):
    async def go():
        async with AsyncClient(localhost(tls_server), timeout=60, tls_ca=certs["ca"], token=tokens["client"]) as c:
            assert await c.health() == "SERVING"
            models = await c.list_models()
            chunks = [ch async for ch in c.generate_stream("the cat", max_new_tokens=3, ignore_eos=True)]
        async with AsyncClient(localhost(tls_server), timeout=60, tls_ca=certs["ca"], token="") as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.list_models()
        return models, chunks, e.value.code()

    models, chunks, refusal = asyncio.run(go())
    assert [m.role for m in models] == ["policy"] and chunks
    assert refusal == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_needs_a_client_certificate(mtls_server, certs, other_certs):
    with Client(localhost(mtls_server), tls_ca=certs["ca"]) as c:
        assert refused(c) == grpc.StatusCode.UNAVAILABLE
    # a certificate from a CA the server does not trust
    with Client(localhost(mtls_server), tls_ca=certs["ca"], tls_cert=other_certs["client_cert"],
                tls_key=other_certs["client_key"]) as c:
        assert refused(c) == grpc.StatusCode.UNAVAILABLE
    with Client(localhost(mtls_server), timeout=60, tls_ca=certs["ca"], tls_cert=certs["client_cert"],
                tls_key=certs["client_key"]) as c:
        assert c.health() == "SERVING"
        assert len(c.generate("the cat", max_new_tokens=2, ignore_eos=True).completions[0].token_ids) == 2

    async def go():
        async with AsyncClient(localhost(mtls_server), timeout=60, tls_ca=certs["ca"], tls_cert=certs["client_cert"],
                               tls_key=certs["client_key"]) as c:
            return await c.list_models()

    assert [m.role for m in asyncio.run(go())] == ["policy"]


def test_the_cli_over_tls(tls_server, mtls_server, certs, tokens, capsys):
    assert main(["models", "--address", localhost(tls_server), "--tls-ca", certs["ca"], "--token", tokens["client"],
                 "--json"]) == 0
    assert [m["role"] for m in json.loads(capsys.readouterr().out)] == ["policy"]
    assert main(["generate", "the cat", "--address", localhost(mtls_server), "--tls-ca", certs["ca"],
                 "--tls-cert", certs["client_cert"], "--tls-key", certs["client_key"], "--max-new-tokens", "2",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"][0]["token_ids"]) >= 1
    with pytest.raises(SystemExit) as e:  # plaintext to a TLS port: a message, not a traceback
        main(["models", "--address", localhost(tls_server), "--token", tokens["client"], "--timeout", "10"])
    assert "UNAVAILABLE" in str(e.value.code) and "--tls-ca" in str(e.value.code)


def test_unreadable_or_unpaired_files_are_named(tmp_path, certs, capsys):
    with pytest.raises(ValueError, match=r"tls_ca .*nope\.pem: cannot read it"):
        Client("localhost:1", tls_ca=str(tmp_path / "nope.pem"))
    (tmp_path / "ca.txt").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"tls_ca .*ca\.txt: not a PEM file"):
        Client("localhost:1", tls_ca=str(tmp_path / "ca.txt"))
    with pytest.raises(ValueError, match="tls_cert and tls_key together"):
        Client("localhost:1", tls_ca=certs["ca"], tls_cert=certs["client_cert"])
    with pytest.raises(ValueError, match="whitespace"):
        Client("localhost:1", token="two words")
    # the CLI names its flags, as an argparse error (exit status 2)
    for argv, flag in ((["--tls-ca", str(tmp_path / "nope.pem")], "--tls-ca"),
                       (["--tls-ca", certs["ca"], "--tls-key", certs["client_key"]], "--tls-cert"),
                       (["--tls-ca", certs["ca"], "--tls-cert", certs["client_cert"],
                         "--tls-key", str(tmp_path / "ca.txt")], "--tls-key")):
        with pytest.raises(SystemExit) as e:
            main(["models", "--address", "localhost:1"] + argv)
        assert e.value.code == 2
        assert flag in capsys.readouterr().err
