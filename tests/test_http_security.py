"""The HTTP side (labeling API, pages, /metrics) against hostile and unauthorised callers,
over real HTTP on loopback: tokens and roles per route, votes under the token's name,
/metrics behind its own token, JSON-only bodies, Host and Origin checks, security headers,
bounded bodies, malformed bodies, half-sent requests, the connection limit, and TLS."""

import http.client
import json
import socket
import ssl
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.feedback import FeedbackStore

TOKENS = {"client-token-0123456789": {"name": "app-1", "role": "client"},
          "annotator-token-0123456789": {"name": "ann-7", "role": "annotator"},
          "admin-token-0123456789": {"name": "root", "role": "admin"}}
TOKEN = {entry["role"]: token for token, entry in TOKENS.items()}
METRICS_TOKEN = "metrics-token-0123456789"
READ_TIMEOUT = 1.0
# A concurrent small request must be answered within this while a hostile one runs (the
# machine running the suite may be busy: a healthy reply takes milliseconds).
PROMPT_S = 0.5
# A server-chosen matchup (any client may ask for one: issue #17), decoded with ARENA_SAMPLING;
# choosing what answers (samplesOf, models) is the admin's.
SMALL_COMPARISON = {"prompt": "the cat"}
CHOSEN_COMPARISON = {"prompt": "the cat", "samplesOf": "policy", "sampling": {"maxNewTokens": 2, "temperature": 1.0}}
ARENA_SAMPLING = '{"maxNewTokens": 2, "temperature": 1.0}'


def serve(tmp_path, policy_dir, **options) -> ServerThread:
    """The policy also served as the reference: two policies for server-chosen matchups."""
    srv = ServerThread(ServeConfig(policy=str(policy_dir), reference=str(policy_dir), arena_sampling=ARENA_SAMPLING,
                                   port=0, metrics_port=0, device="cpu",
                                   feedback_db=f"sqlite:///{tmp_path / 'fb.db'}", http_read_timeout=READ_TIMEOUT,
                                   **options)).wait_loaded()
    srv.db = tmp_path / "fb.db"
    srv.http_port = srv.server.metrics_port
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_policy_dir):
    root = tmp_path_factory.mktemp("httpsec")
    (root / "tokens.json").write_text(json.dumps(TOKENS))
    srv = serve(root, tiny_policy_dir, auth_tokens=str(root / "tokens.json"), metrics_token=METRICS_TOKEN,
                allowed_origins=["https://label.example.com"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, tiny_policy_dir):
    """No tokens, no metrics token, at most 4 HTTP connections at once."""
    srv = serve(tmp_path_factory.mktemp("httpopen"), tiny_policy_dir, max_http_connections=4)
    yield srv
    srv.stop()


def call(srv, method, path, body=None, token=None, headers=None, raw=None, connection=None):
    """(status, headers, parsed JSON or raw bytes) of one request."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    hdrs = {k: v for k, v in hdrs.items() if v is not None}  # None: leave the header out
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        content = resp.read()
        kind = resp.getheader("Content-Type", "")
        return resp.status, resp, json.loads(content) if kind == "application/json" and content else content
    finally:
        conn.close()


def stored(srv) -> tuple[int, int]:
    """(comparisons, votes) counted by the server since it started."""
    totals = {"rlhfkit:feedback_comparisons": 0, "rlhfkit:feedback_votes": 0}
    for family in srv.server.metrics.registry.collect():
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(totals["rlhfkit:feedback_comparisons"]), int(totals["rlhfkit:feedback_votes"])


def refusals(srv, route: str, code: str) -> float:
    value = srv.server.metrics.registry.get_sample_value("rlhfkit:rpc_errors_total",
                                                         {"method": f"http:{route}", "code": code})
    return value or 0.0


UNKNOWN_VOTE = {"comparisonId": "0" * 32, "choice": "CHOICE_LEFT"}
# (method, path, body, role needed, status of an allowed caller)
API_ROUTES = [("GET", "/api/prompt", None, "client", 200),
              ("GET", "/api/models", None, "client", 200),
              ("GET", "/api/whoami", None, "client", 200),
              ("GET", "/api/leaderboard", None, "client", 200),
              ("POST", "/api/leaderboard", {}, "client", 200),
              ("POST", "/api/comparisons", SMALL_COMPARISON, "client", 200),
              ("POST", "/api/comparisons", CHOSEN_COMPARISON, "admin", 200),
              ("POST", "/api/votes", UNKNOWN_VOTE, "annotator", 404),  # allowed: then the comparison is unknown
              ("GET", "/api/annotators", None, "admin", 200),
              ("GET", "/api/annotators?days=7", None, "admin", 200)]
RANK = {"client": 0, "annotator": 1, "admin": 2}


@pytest.mark.parametrize("method,path,body,needed,allowed_status", API_ROUTES)
def test_api_routes_by_role(server, method, path, body, needed, allowed_status):
    status, resp, reply = call(server, method, path, body)
    assert (status, reply["code"]) == (401, "UNAUTHENTICATED") and resp.getheader("WWW-Authenticate") == "Bearer"
    status, resp, reply = call(server, method, path, body, token="not-a-token-0123456789")
    assert (status, reply["code"], reply["error"]) == (401, "UNAUTHENTICATED", "unknown token")
    status, _, reply = call(server, method, path, body, headers={"Authorization": TOKEN["admin"]})  # no "Bearer"
    assert status == 401
    for role, token in TOKEN.items():
        status, _, reply = call(server, method, path, body, token=token)
        if RANK[role] >= RANK[needed]:
            assert status == allowed_status, (role, reply)
        else:
            assert (status, reply["code"]) == (403, "PERMISSION_DENIED") and needed in reply["error"]


def test_pages_stay_open_and_refusals_are_counted(server):
    for path in ("/", "/label", "/leaderboard", "/annotators", "/static/label.js", "/static/api.js", "/static/style.css"):
        assert call(server, "GET", path)[0] == 200, path
    before = refusals(server, "models", "UNAUTHENTICATED"), refusals(server, "submit_vote", "PERMISSION_DENIED")
    call(server, "GET", "/api/models")
    call(server, "POST", "/api/votes", UNKNOWN_VOTE, token=TOKEN["client"])
    assert refusals(server, "models", "UNAUTHENTICATED") == before[0] + 1
    assert refusals(server, "submit_vote", "PERMISSION_DENIED") == before[1] + 1
    assert call(server, "GET", "/api/whoami", token=TOKEN["annotator"])[2] == {"name": "ann-7", "role": "annotator",
                                                                              "open": False}


def test_vote_is_recorded_under_the_tokens_name(server):
    status, _, comp = call(server, "POST", "/api/comparisons", SMALL_COMPARISON, token=TOKEN["client"])
    assert status == 200
    vote = {"comparisonId": comp["comparison_id"], "choice": "CHOICE_RIGHT"}
    status, _, reply = call(server, "POST", "/api/votes", {**vote, "annotatorId": "someone-else"},
                            token=TOKEN["annotator"])
    assert (status, reply["code"]) == (403, "PERMISSION_DENIED") and "ann-7" in reply["error"]
    status, _, reply = call(server, "POST", "/api/votes", vote, token=TOKEN["annotator"])
    assert status == 200 and not reply["already_recorded"]
    status, _, again = call(server, "POST", "/api/votes", {**vote, "annotatorId": "ann-7"}, token=TOKEN["annotator"])
    assert status == 200 and again["already_recorded"] and again["vote_id"] == reply["vote_id"]
    store = FeedbackStore(f"sqlite:///{server.db}")
    rows = [r for r in store.voted_comparisons() if r["comparison_id"] == comp["comparison_id"]]
    store.close()
    assert [(r["annotator_id"], r["choice"]) for r in rows] == [("ann-7", "right")]


def test_metrics_token(server, open_server):
    assert call(server, "GET", "/metrics")[0] == 401
    assert call(server, "GET", "/metrics", token=TOKEN["admin"])[0] == 401  # its own token, not the API's
    status, resp, text = call(server, "GET", "/metrics", token=METRICS_TOKEN)
    assert status == 200 and b"rlhfkit:rpc_errors_total" in text
    assert refusals(server, "metrics", "UNAUTHENTICATED") >= 2
    status, _, text = call(open_server, "GET", "/metrics")
    assert status == 200 and b"rlhfkit:feedback_votes" in text
    # Without tokens every route is open, as before.
    assert call(open_server, "GET", "/api/models")[0] == 200
    assert call(open_server, "GET", "/api/whoami")[2] == {"name": None, "role": None, "open": True}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None, "application/jsonx", "application/json; charset=latin-1"])
def test_only_json_bodies_are_accepted(server, content_type):
    # What a cross-site page can post without a preflight: text/plain, forms; none is stored.
    before = stored(server)
    status, _, reply = call(server, "POST", "/api/comparisons", SMALL_COMPARISON, token=TOKEN["annotator"],
                            headers={"Content-Type": content_type})
    assert (status, reply["code"]) == (415, "INVALID_ARGUMENT") and "application/json" in reply["error"]
    assert stored(server) == before
    status, _, _ = call(server, "POST", "/api/comparisons", SMALL_COMPARISON, token=TOKEN["annotator"],
                        headers={"Content-Type": "application/json; charset=UTF-8"})
    assert status == 200 and stored(server)[0] == before[0] + 1


def test_a_cross_site_request_without_an_origin_is_refused(open_server):
    """Another site's <img src=".../api/leaderboard?bootstrap_rounds=1000"> sends no Origin but
    Sec-Fetch-Site: cross-site (browsers since 2020); the page's own calls say same-origin."""
    path = "/api/leaderboard?bootstrap_rounds=1000"
    status, _, reply = call(open_server, "GET", path, headers={"Sec-Fetch-Site": "cross-site"})
    assert (status, reply["code"]) == (403, "PERMISSION_DENIED") and "cross-site" in reply["error"]
    for site in ("same-origin", "none", None):  # none: typed in the address bar; None: not a browser
        assert call(open_server, "GET", "/api/leaderboard", headers={"Sec-Fetch-Site": site})[0] == 200, site


def test_foreign_origin_and_host_are_refused(server):
    port = server.http_port
    before = stored(server)
    for origin in ("https://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                   "http://label.example.com"):
        status, _, reply = call(server, "POST", "/api/comparisons", SMALL_COMPARISON, token=TOKEN["client"],
                                headers={"Origin": origin})
        assert (status, reply["code"]) == (403, "PERMISSION_DENIED") and "Origin" in reply["error"], origin
    assert stored(server) == before
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", "https://label.example.com"):
        status, _, _ = call(server, "GET", "/api/models", token=TOKEN["client"], headers={"Origin": origin})
        assert status == 200, origin
    # DNS rebinding: another name that resolves here. Pages stay open (they hold no data).
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1:x", "a/b"):
        status, _, reply = call(server, "GET", "/api/models", token=TOKEN["client"], headers={"Host": host})
        assert (status, reply["code"]) == (403, "PERMISSION_DENIED"), host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", "label.example.com",
                 "label.example.com:443"):
        assert call(server, "GET", "/api/models", token=TOKEN["client"], headers={"Host": host})[0] == 200, host
    assert call(server, "GET", "/", headers={"Host": "evil.example"})[0] == 200


def test_security_headers(server):
    status, resp, page = call(server, "GET", "/")
    csp = resp.getheader("Content-Security-Policy")
    assert status == 200 and "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and resp.getheader("X-Frame-Options") == "DENY"
    # Every script is a file of ours (the CSP forbids inline script).
    assert page.count(b"<script") == page.count(b'<script src="/static/') == 2
    for method, path, token in (("GET", "/api/models", TOKEN["client"]), ("GET", "/api/models", None),
                                ("GET", "/nothing", None), ("GET", "/static/label.js", None)):
        status, resp, _ = call(server, method, path, token=token)
        assert resp.getheader("X-Content-Type-Options") == "nosniff", path
        assert resp.getheader("Server") == "rlhfkit", path  # no Python version


def raw_request(port, data: bytes, timeout=10.0, context=None) -> tuple[int, dict, float]:
    """Send bytes, read the reply to its end: (status, JSON body, seconds until the reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(data)
        reply = read_all(sock)
        took = time.monotonic() - start
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), took


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def headers_of(server, path, body_length, extra=""):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\n"
            f"Authorization: Bearer {TOKEN['annotator']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_length}\r\n{extra}\r\n").encode()


def test_big_body_is_refused_before_it_is_read_and_stalls_nothing(server):
    body = b'{"prompt": "' + b"x" * (6 * 1024 * 1024) + b'"}'  # 6 MB, over the default 4 MiB
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before timing
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(headers_of(server, "/api/comparisons", len(body)))
        reply = b""
        while not reply.endswith(b"}"):  # the whole JSON reply, before a byte of the body was sent
            reply += sock.recv(65536)
        assert time.monotonic() - start < PROMPT_S and reply.startswith(b"HTTP/1.0 413 ")
        assert b"--max-request-bytes" in reply

        def flood():
            try:
                sock.sendall(body)
            except OSError:  # the server stops reading after a while: that is the point
                pass
        sender = threading.Thread(target=flood)
        sender.start()
        grpc_latency, http_latency = [], []
        while sender.is_alive() or not grpc_latency:
            t = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            grpc_latency.append(time.monotonic() - t)
            t = time.monotonic()
            assert call(server, "GET", "/api/models", token=TOKEN["client"])[0] == 200
            http_latency.append(time.monotonic() - t)
        sender.join()
    channel.close()
    assert max(grpc_latency) < PROMPT_S and max(http_latency) < PROMPT_S, (grpc_latency, http_latency)
    assert call(server, "GET", "/api/models", token=TOKEN["client"])[0] == 200  # still serving


@pytest.mark.parametrize("body,message", [
    (b"[]", "expected a JSON object, got an array"), (b"3", "expected a JSON object, got a number"),
    (b'"x"', "expected a JSON object, got a string"), (b"null", "expected a JSON object, got null"),
    (b"true", "expected a JSON object, got true or false"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "\xff\xfe"}', "not UTF-8"), (b"\xff\xfe{\x00}\x00", "not UTF-8"),
    (b"{oops", "not valid JSON"), (b"1" * 5000, "not valid JSON"),
    (b'{"prompt": 3}', "prompt"), (b'{"no_such_field": 1}', "no_such_field"),
    (b'{"prompt": "x", "sampling": {"maxNewTokens": "' + b"9" * 100_000 + b'"}}', "maxNewTokens"),
])
def test_malformed_bodies_get_400_naming_the_problem(server, body, message):
    status, _, reply = call(server, "POST", "/api/comparisons", raw=body, token=TOKEN["client"])
    assert (status, reply["code"]) == (400, "INVALID_ARGUMENT") and message in reply["error"], reply
    assert len(reply["error"]) < 1000  # an echoed value is shortened


def test_wrong_content_length_and_framing(server):
    # Declares more than it sends: a JSON 408 once the read timeout has passed, no hang.
    status, reply, took = raw_request(server.http_port, headers_of(server, "/api/votes", 100) + b'{"a": 1}')
    assert (status, reply["code"]) == (408, "DEADLINE_EXCEEDED") and "Content-Length" in reply["error"]
    assert READ_TIMEOUT * 0.8 < took < READ_TIMEOUT + 3
    # Declares more, then closes its side: what arrived is short.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(headers_of(server, "/api/votes", 100) + b'{"a": 1}')
        sock.shutdown(socket.SHUT_WR)
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 ") and "8 bytes arrived" in json.loads(body)["error"]
    for extra, length, status_wanted in (("", "abc", 400), ("", "-1", 400), ("Content-Length: 3\r\n", "2", 400),
                                         ("Transfer-Encoding: chunked\r\n", "2", 411)):
        data = headers_of(server, "/api/votes", length, extra) + b"{}"
        status, reply, _ = raw_request(server.http_port, data)
        assert status == status_wanted and reply["code"] == "INVALID_ARGUMENT", (extra, length, reply)


def test_methods_and_oversized_request_lines_get_json(server):
    for method, path, wanted in (("PUT", "/api/votes", 405), ("DELETE", "/api/models", 405), ("PUT", "/", 405),
                                 ("BREW", "/nothing", 404), ("OPTIONS", "/api/votes", 405), ("POST", "/metrics", 405)):
        status, resp, reply = call(server, method, path, token=TOKEN["admin"])
        assert status == wanted and reply["code"] in ("UNIMPLEMENTED", "NOT_FOUND"), (method, path, reply)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:  # no body, even a refusal's
        sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 405 ") and b"Content-Type: application/json" in head and body == b""
    status, reply, _ = raw_request(server.http_port, b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
    assert (status, reply["code"]) == (414, "RESOURCE_EXHAUSTED")
    status, reply, _ = raw_request(server.http_port, b"GET / HTTP/1.0\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    assert (status, reply["code"]) == (431, "RESOURCE_EXHAUSTED")
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    status, reply, _ = raw_request(server.http_port, b"GET / HTTP/1.0\r\n" + headers + b"\r\n")
    assert status == 431
    status, reply, _ = raw_request(server.http_port, b"GET / HTTP/9.9\r\n\r\n")
    assert status == 505 and reply["code"] == "UNIMPLEMENTED"
    assert call(server, "GET", "/api/models", token=TOKEN["client"])[0] == 200


def test_half_sent_requests_hold_nothing(server):
    stuck = [socket.create_connection(("127.0.0.1", server.http_port), timeout=10) for _ in range(40)]
    start = time.monotonic()
    for sock in stuck:
        sock.sendall(b"GET /api/models HT")
    trickler = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)

    def trickle():  # a byte every 0.2 s: the deadline is for the whole request, not per byte
        try:
            for byte in b"GET /api/models HTTP/1.0\r\nX-Slow: " + b"a" * 100:
                trickler.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass
    threading.Thread(target=trickle, daemon=True).start()
    t = time.monotonic()
    assert call(server, "GET", "/api/models", token=TOKEN["client"])[0] == 200
    assert time.monotonic() - t < PROMPT_S
    for sock in stuck + [trickler]:
        head, _, body = read_all(sock).partition(b"\r\n\r\n")  # the server closes it: EOF
        assert head.startswith(b"HTTP/1.0 408 ") and json.loads(body)["code"] == "DEADLINE_EXCEEDED"
        sock.close()
    assert READ_TIMEOUT * 0.8 < time.monotonic() - start < READ_TIMEOUT + 3
    # A connection that never sent a byte is closed without a reply.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as idle:
        t = time.monotonic()
        assert read_all(idle) == b"" and time.monotonic() - t < READ_TIMEOUT + 3


def test_connections_over_the_limit_wait_for_a_free_one(open_server):
    # 4 connections at most: a fifth is accepted only when one ends (here: the read timeout).
    stuck = [socket.create_connection(("127.0.0.1", open_server.http_port), timeout=10) for _ in range(4)]
    for sock in stuck:
        sock.sendall(b"GET /api/models HT")
    time.sleep(0.1)
    t = time.monotonic()
    assert call(open_server, "GET", "/api/models")[0] == 200
    took = time.monotonic() - t
    assert READ_TIMEOUT * 0.5 < took < READ_TIMEOUT + 3, took
    for sock in stuck:
        sock.close()
    t = time.monotonic()
    assert call(open_server, "GET", "/api/models")[0] == 200 and time.monotonic() - t < PROMPT_S


# --- TLS on the HTTP port ---

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from tls_certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory, tiny_policy_dir, certs):
    """{"tls": server certificate only, "mtls": client certificates required}."""
    tls = dict(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    servers = {"tls": serve(tmp_path_factory.mktemp("tls"), tiny_policy_dir, **tls),
               "mtls": serve(tmp_path_factory.mktemp("mtls"), tiny_policy_dir, tls_client_ca=certs["ca"], **tls)}
    yield servers
    for srv in servers.values():
        srv.stop()


def https(srv, certs, client_cert=False, host="127.0.0.1"):
    context = ssl.create_default_context(cafile=certs["ca"])
    if client_cert:
        context.load_cert_chain(certs["client_cert"], certs["client_key"])
    return http.client.HTTPSConnection(host, srv.http_port, context=context, timeout=10)


def test_https_with_the_test_ca(tls_servers, certs):
    srv = tls_servers["tls"]
    status, _, reply = call(srv, "GET", "/api/models", connection=https(srv, certs))
    assert status == 200 and reply["models"] == ["policy", "reference"]
    status, _, _ = call(srv, "GET", "/api/models", connection=https(srv, certs, host="localhost"),
                        headers={"Origin": f"https://localhost:{srv.http_port}"})
    assert status == 200
    status, _, _ = call(srv, "GET", "/api/models", connection=https(srv, certs),
                        headers={"Origin": f"http://127.0.0.1:{srv.http_port}"})  # not this server's scheme
    assert status == 403
    # Plain HTTP to the TLS port gets a plain refusal, nothing else.
    status, _, reply = call(srv, "GET", "/api/models")
    assert status == 400 and "TLS" in reply["error"]
    # A certificate from another CA is not trusted by the client.
    from tls_certs import make_certs
    other = make_certs(certs["ca"].rsplit("/", 1)[0] + "/other")
    with pytest.raises(ssl.SSLCertVerificationError):
        call(srv, "GET", "/api/models", connection=https(srv, other))


def test_a_silent_tls_client_blocks_no_one(tls_servers, certs):
    srv = tls_servers["tls"]
    silent = [socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) for _ in range(8)]
    time.sleep(0.1)
    t = time.monotonic()
    assert call(srv, "GET", "/api/models", connection=https(srv, certs))[0] == 200
    assert time.monotonic() - t < PROMPT_S
    t = time.monotonic()
    for sock in silent:  # the handshake has the read timeout too
        assert read_all(sock) == b""
        sock.close()
    assert time.monotonic() - t < READ_TIMEOUT + 3


def test_mutual_tls(tls_servers, certs):
    srv = tls_servers["mtls"]
    status, _, reply = call(srv, "GET", "/api/models", connection=https(srv, certs, client_cert=True))
    assert status == 200 and reply["models"] == ["policy", "reference"]
    # Without a client certificate: no reply (TLS 1.3 reports it on the first read).
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        call(srv, "GET", "/api/models", connection=https(srv, certs))


def test_metrics_refuse_a_foreign_host(open_server):
    """An open /metrics read through DNS rebinding (another name resolving here) is refused."""
    status, _, reply = call(open_server, "GET", "/metrics", headers={"Host": "evil.example"})
    assert (status, reply["code"]) == (403, "PERMISSION_DENIED")
    assert call(open_server, "GET", "/metrics", headers={"Host": f"localhost:{open_server.http_port}"})[0] == 200


def test_long_arrays_are_refused_before_parsing(server, open_server):
    """1.3 million stop token ids (3.9 MB, under --max-request-bytes) took ParseDict about 6 s;
    they are refused at once, and a concurrent health check is not held up."""
    body = json.dumps({"prompt": "a", "samplesOf": "policy", "sampling": {"stopTokenIds": [1] * 1_300_000}}).encode()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(open_server.address))
    result = {}

    def post():
        start = time.monotonic()
        result["reply"] = call(open_server, "POST", "/api/comparisons", raw=body)
        result["took"] = time.monotonic() - start

    thread = threading.Thread(target=post)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        start = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        slowest = max(slowest, time.monotonic() - start)
    thread.join()
    status, _, reply = result["reply"]
    assert (status, reply["code"]) == (400, "INVALID_ARGUMENT")
    assert reply["error"].startswith("sampling.stopTokenIds: 1300000 entries") and "--max-stop" in reply["error"]
    print(f"refused in {result['took']:.2f} s; slowest health check meanwhile {slowest * 1000:.0f} ms")
    assert result["took"] < 2.0 and slowest < PROMPT_S
