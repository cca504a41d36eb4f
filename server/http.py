"""The server's HTTP side (--metrics-port): Prometheus /metrics, the labeling, leaderboard
and annotators pages, and the small JSON API those pages call.

A stdlib threaded HTTP server in a background thread (no extra dependency; the pages are
plain files, no build step). JSON requests and replies are the Feedback protos in their
standard JSON mapping (query parameters are fields too); each runs the Feedback
servicer's own code on the server's event loop, so the page and a gRPC client get the same
validation, statuses and store.

Access (ARCHITECTURE.md "Access and transport"): with --auth-tokens the /api routes need
`Authorization: Bearer TOKEN` (ROUTES gives each route's role; a vote is recorded under
the token's name); the pages and /static stay open, the page asks for the token.
/metrics is open unless --metrics-token is set. With --tls-cert the port speaks only TLS.

Hostile input: an /api request whose Host or Origin is not this server's (or one of
--allowed-origins) is refused, which stops DNS rebinding and cross-site posts; bodies must
be application/json (a cross-site form or text/plain post cannot be), at most
--max-request-bytes, and arrive with the request line and headers within
--http-read-timeout of the connection's start. One request per connection (HTTP/1.0), at
most --max-http-connections at once: more wait, unaccepted, in the listen queue until one
finishes (each is bounded by the read timeout), so a flood costs no threads. Every error
is a JSON {"code": GRPC_CODE_NAME, "error": message}.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import io
import json
import logging
import random
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlhfkit.errors import shortened
from rlhfkit.server.auth import authorize, bearer_token, caller, is_loopback
from rlhfkit.server.errors import (REQUEST_ERRORS, PermissionDeniedError, UnauthenticatedError,
                                   http_status_for)
from rlhfkit.v1 import feedback_pb2 as fb_pb

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGES = {"/": "label.html", "/label": "label.html", "/leaderboard": "leaderboard.html",
         "/annotators": "annotators.html"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
# Drawn when the server was given no --feedback-prompts file. A file's line is {"prompt": TEXT}
# or, TRL's conversational prompt, {"prompt": [{"role": ..., "content": ...}, ...]}.
DEFAULT_PROMPTS = ["the cat", "Write a haiku about the sea.", "Explain what a reward model is, in one sentence.",
                   "count the words: the quick brown fox\nanswer:", "Give three tips for writing clear code."]


@dataclass(frozen=True)
class Route:
    name: str  # in rlhfkit:rpc_errors_total as "http:NAME"
    methods: tuple[str, ...]
    role: str
    answer: str  # the HttpSide method that answers it: answer(handler, route, caller identity)
    message: type | None = None  # the request proto of a route that calls the Feedback servicer
    servicer_method: str = ""


ROUTES = {
    "/api/prompt": Route("prompt", ("GET",), "client", "draw_prompt"),
    "/api/models": Route("models", ("GET",), "client", "list_models"),
    "/api/whoami": Route("whoami", ("GET",), "client", "whoami"),
    "/api/comparisons": Route("create_comparison", ("POST",), "client", "call", fb_pb.CreateComparisonRequest,
                              "CreateComparison"),
    "/api/votes": Route("submit_vote", ("POST",), "annotator", "call", fb_pb.SubmitVoteRequest, "SubmitVote"),
    "/api/leaderboard": Route("leaderboard", ("GET", "POST"), "client", "call", fb_pb.GetLeaderboardRequest,
                              "GetLeaderboard"),
    "/api/annotators": Route("annotators", ("GET", "POST"), "admin", "call", fb_pb.GetAnnotatorsRequest,
                             "GetAnnotators"),
}

# The pages load only their own files: no inline script, no framing (clickjacking a vote).
PAGE_CSP = ("default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
DATA_CSP = "default-src 'none'; frame-ancestors 'none'"
# The gRPC code name each HTTP-level refusal carries, like the servicers' errors do.
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 411: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED",
              414: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 431: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
              503: "UNAVAILABLE", 505: "UNIMPLEMENTED"}
MAX_REQUEST_LINE = 65536  # the stdlib's own cap; headers keep theirs (65536 per line, 100 lines)
JSON_TYPE = re.compile(r"application/json\s*(;\s*charset\s*=\s*\"?utf-8\"?\s*)?", re.IGNORECASE)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
DEFAULT_PORTS = {"http": 80, "https": 443}
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
              type(None): "null"}
# After refusing a body without reading it, the rest that is already on its way is read and
# dropped (at most this long) before closing: closing with unread input sends a reset, and
# the client would lose the reply.
DRAIN_SECONDS = 1.0
# A client that closed its connection (or stopped reading) while we replied: not our error.
GONE = (ConnectionError, TimeoutError, ssl.SSLError)


class HttpError(Exception):
    """A refusal: the status, the gRPC code name and the message of the JSON reply."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or HTTP_CODES[status]
        self.headers = headers or {}


def tls_context(config) -> ssl.SSLContext | None:
    """The server side of --tls-cert/--tls-key (client certificates required with
    --tls-client-ca), None for plain HTTP."""
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {e}") from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--tls-client-ca {config.tls_client_ca}: {e}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _origin(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    return scheme, host.lower().rstrip("."), port if port is not None else DEFAULT_PORTS[scheme]


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin `scheme://host[:port]`; None for "null" or garbage."""
    try:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        return _origin(parts.scheme, parts.hostname, parts.port)
    except ValueError:  # a port that is not a number in range
        return None


def parse_host(value: str) -> tuple[str, int | None] | None:
    """(host, port or None) of a Host header; None for garbage."""
    try:
        parts = urlsplit("//" + value.strip())
        if not parts.hostname or parts.path or parts.query or parts.username is not None:
            return None
        return parts.hostname.lower().rstrip("."), parts.port
    except ValueError:
        return None


def _serves(origin: tuple[str, str, int], host: str, port: int | None) -> bool:
    """Whether a Host header's (host, port) names `origin` (no port: its scheme's default)."""
    scheme, origin_host, origin_port = origin
    return host == origin_host and origin_port == (port if port is not None else DEFAULT_PORTS[scheme])


class _UntilDeadline(io.RawIOBase):
    """A socket's input that ends in TimeoutError at a fixed time: the whole request (line,
    headers, body) must arrive within --http-read-timeout, not each byte of it, so a client
    trickling a byte a second cannot hold a connection for long."""

    def __init__(self, sock, deadline: float):
        self.sock, self.deadline, self.received = sock, deadline, 0

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within --http-read-timeout")
        self.sock.settimeout(left)
        n = self.sock.recv_into(buffer)
        self.received += n
        return n


class _Handler(BaseHTTPRequestHandler):
    """One connection, one request; the HttpSide (self.server.side) answers it."""

    default_request_version = "HTTP/1.0"  # even a refusal of a malformed request line has a status line

    def setup(self):
        self.side: HttpSide = self.server.side
        self.deadline = time.monotonic() + self.side.read_timeout
        self.timeout = self.side.read_timeout  # writes: each reply must be taken within it
        super().setup()
        self.rfile.close()
        self.input = _UntilDeadline(self.connection, self.deadline)
        self.rfile = io.BufferedReader(self.input)
        self.body_pending = False  # a body the reply did not wait for may still be on its way
        self.replied = False
        # For a reply before the request line is read (parse_request sets them)
        self.requestline, self.command, self.request_version = "", "", self.default_request_version

    def handle(self):
        # The TLS handshake here, in the connection's own thread: a slow or silent client
        # holds only its own thread, never the accept loop.
        if self.server.tls is not None and not self.handshake():
            return
        try:
            super().handle()
        except GONE as e:  # the client went away mid-reply
            log.debug("%s: %s", self.address_string(), e)

    def handshake(self) -> bool:
        try:
            self.connection.settimeout(max(0.001, self.deadline - time.monotonic()))
            self.connection.do_handshake()
            return True
        except ssl.SSLError as e:
            if e.reason == "HTTP_REQUEST":  # plain HTTP to the TLS port: say so, in plain HTTP
                body = b'{"code": "INVALID_ARGUMENT", "error": "this port speaks TLS only: use https://"}'
                try:
                    socket.socket.sendall(self.connection, b"HTTP/1.0 400 Bad Request\r\nContent-Type: application/json"
                                          b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                except OSError:
                    pass
            log.debug("%s: TLS handshake failed: %s", self.address_string(), e)
        except OSError as e:
            log.debug("%s: TLS handshake failed: %s", self.address_string(), e)
        return False

    def handle_one_request(self):
        # The stdlib's, with every method dispatched to HttpSide (a JSON 404/405, never its
        # HTML 501) and a timed-out request answered 408 rather than dropped.
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "the request line is over 65536 bytes")
                return
            if not self.raw_requestline:
                return
            if not self.parse_request():  # it has replied (400, 431, 505)
                return
            self.side.handle(self)
            self.wfile.flush()
        except TimeoutError:
            if not self.replied and self.input.received:  # a connection that sent nothing is just closed
                self.side.refuse(self, "other", HttpError(408, "the request did not arrive within "
                                                               f"--http-read-timeout {self.side.read_timeout:g}s"))

    def send_error(self, code, message=None, explain=None):
        """The stdlib's parse errors, as JSON like every other refusal."""
        self.close_connection = True
        self.side.refuse(self, "other", HttpError(int(code), message or HTTPStatus(code).phrase))

    def finish(self):
        try:
            super().finish()
            if self.body_pending:
                self.drain()
        except OSError:
            pass

    def drain(self):
        self.connection.shutdown(socket.SHUT_WR)  # the reply is complete: the client may read it now
        end = time.monotonic() + DRAIN_SECONDS
        buffer = bytearray(65536)
        while (left := end - time.monotonic()) > 0:
            self.connection.settimeout(left)
            if not self.connection.recv_into(buffer):
                return

    def version_string(self):
        return "rlhfkit"

    def log_message(self, fmt, *args):  # the access log goes to debug, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Connections over --max-http-connections wait here, accepted by the kernel but not yet
    # by us: they cost no thread.
    request_queue_size = 128

    def __init__(self, address, side: HttpSide, tls: ssl.SSLContext | None, max_connections: int):
        self.side, self.tls = side, tls
        self.slots = threading.BoundedSemaphore(max_connections)
        self.closing = False
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def get_request(self):
        sock, address = self.socket.accept()
        if self.tls is not None:
            try:  # no I/O yet: the handshake is done in the connection's thread
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                sock.close()
                raise
        return sock, address

    def process_request(self, request, client_address):
        # Waits for a free slot in the accept loop: further connections stay in the listen
        # queue meanwhile. A slot is freed when its request has not arrived within the read
        # timeout, or when it is answered (a comparison: once both responses are generated).
        while not self.slots.acquire(timeout=0.2):
            if self.closing:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], GONE):
            log.debug("HTTP client %s went away", client_address)
        else:
            log.exception("HTTP connection from %s failed", client_address)


class HttpSide:
    def __init__(self, config, metrics, feedback, registry, loop: asyncio.AbstractEventLoop,
                 prompts: list[str] | None = None, tokens=None):
        self.metrics, self.feedback, self.registry, self.loop = metrics, feedback, registry, loop
        self.tokens = tokens
        self.metrics_token = config.metrics_token
        self.max_request_bytes = config.max_request_bytes
        self.limits = config
        self.read_timeout = config.http_read_timeout
        self.prompts = [self.drawable(p) for p in prompts or DEFAULT_PROMPTS]
        tls = tls_context(config)
        self.scheme = "https" if tls else "http"
        self.httpd = _Server((config.host, config.metrics_port), self, tls, config.max_http_connections)
        self.port = self.httpd.server_port
        self.allowed_origins = {o for o in map(parse_origin, config.allowed_origins) if o}
        self.own_names = self._own_names(config.host)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rlhfkit-http", daemon=True)
        self._thread.start()

    @staticmethod
    def _own_names(host: str) -> set[str]:
        """The host names a browser may use for this server (with its port). Each connection
        also accepts the address it reached (so any interface of a wildcard bind)."""
        host = host.strip("[]").lower()
        if host in ("", "0.0.0.0", "::"):
            return LOOPBACK_NAMES | {socket.gethostname().lower(), socket.getfqdn().lower()}
        return {host} | (LOOPBACK_NAMES if is_loopback(host) else set())

    @staticmethod
    def drawable(prompt) -> dict:
        """What GET /api/prompt answers for one prompt (checked by app.read_prompts): {"prompt":
        text} or {"messages": [...]}, the fields of CreateComparisonRequest the page then sends."""
        return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}

    def shutdown(self):
        self.httpd.closing = True
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: _Handler):
        path = h.path.split("?", 1)[0]
        route = ROUTES.get(path)
        name = route.name if route else "metrics" if path == "/metrics" else "other"
        h.body_pending = (bool(h.headers.get("Transfer-Encoding"))
                          or (h.headers.get("Content-Length") or "0").strip() != "0")
        try:
            if path == "/metrics":
                self.allow_methods(h, ("GET",))
                self.check_host_and_origin(h)  # an open /metrics must not be readable by DNS rebinding
                self.check_metrics_token(h)
                return self.reply(h, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
            if path in PAGES or path.startswith("/static/"):
                self.allow_methods(h, ("GET",))
                return self.page(h, path)
            if route is None:
                raise HttpError(404, f"no route {shortened(path)}")
            self.allow_methods(h, route.methods)
            self.check_host_and_origin(h)
            identity = self.identify(h, route)
            return getattr(self, route.answer)(h, route, identity)
        except HttpError as e:
            self.refuse(h, name, e)
        except GONE:  # the client closed the connection (or stalled) while we replied
            log.debug("HTTP %s %s: the client went away", h.command, shortened(path))
        except Exception:
            log.exception("HTTP %s %s failed", h.command, shortened(path))
            if not h.replied:
                self.refuse(h, name, HttpError(500, "internal error; the server log has the details"))

    def draw_prompt(self, h, route, identity):
        self.json(h, 200, random.choice(self.prompts))

    def list_models(self, h, route, identity):
        models, roles, _ = self.registry.snapshot()
        self.json(h, 200, {"models": sorted(n for n, m in models.items() if m.kind == "policy"), "roles": roles})

    def whoami(self, h, route, identity):
        """Whose name the page's votes go under (all null, "open": true, without tokens)."""
        self.json(h, 200, {"name": identity and identity.name, "role": identity and identity.role,
                           "open": identity is None})

    def allow_methods(self, h, methods: tuple[str, ...]):
        if h.command not in methods:
            raise HttpError(405, f"{shortened(h.command, 16)} is not allowed here; use {' or '.join(methods)}",
                            headers={"Allow": ", ".join(methods)})

    def page(self, h, path: str):
        name = PAGES.get(path) or path.removeprefix("/static/")
        files = {p.name: p for p in STATIC.iterdir()}  # only files that are there: no path tricks
        if name not in files:
            raise HttpError(404, f"no page {shortened(path)}")
        self.reply(h, 200, files[name].read_bytes(), CONTENT_TYPES.get(files[name].suffix, "text/plain"), page=True)

    def check_metrics_token(self, h):
        if self.metrics_token is None:
            return
        try:
            given = bearer_token(h.headers.get("Authorization")).encode()
        except UnauthenticatedError:
            given = b""
        if not hmac.compare_digest(given, self.metrics_token.encode()):
            raise HttpError(401, "/metrics needs 'Authorization: Bearer METRICS_TOKEN' (--metrics-token)",
                            headers={"WWW-Authenticate": "Bearer"})

    def check_host_and_origin(self, h):
        """A browser sends Host and Origin as it sees them: a page of another site (Origin), a
        request it marks cross-site without an Origin (Sec-Fetch-Site), or another site's name
        resolving to this address (DNS rebinding: Host), is refused."""
        names = self.own_names | {h.connection.getsockname()[0].lower()}
        own = {(self.scheme, n, self.port) for n in names} | self.allowed_origins
        hosts = h.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise HttpError(400, "more than one Host header")
        if hosts:  # browsers always send one; a client without it is no browser
            host = parse_host(hosts[0])
            if host is None or not any(_serves(origin, *host) for origin in own):
                raise HttpError(403, f"Host {shortened(hosts[0])!r} is not this server's address; "
                                     "a name in front of it belongs in --allowed-origins")
        origin = h.headers.get("Origin")
        if origin is not None and parse_origin(origin) not in own:
            raise HttpError(403, f"Origin {shortened(origin)!r} may not call this API (--allowed-origins)")
        # An <img> or a link on another site's page sends no Origin, but browsers mark it
        # cross-site: it must not make the server work (a leaderboard of 1,000 rounds) for it.
        if origin is None and h.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
            raise HttpError(403, "a cross-site request without an Origin (another site's <img> or link) may not "
                                 "call this API")

    def identify(self, h, route: Route):
        if self.tokens is None:
            return None
        try:
            identity = self.tokens.identify(h.headers.get("Authorization"))
            authorize(identity, route.role, h.path.split("?", 1)[0])
        except UnauthenticatedError as e:
            raise HttpError(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None
        except PermissionDeniedError as e:
            raise HttpError(403, str(e)) from None
        return identity

    def call(self, h, route: Route, identity):
        request = self.read_request(h, route.message)
        method = getattr(self.feedback, route.servicer_method)

        async def as_caller():  # the servicer reads who calls from auth.caller, as under gRPC
            caller.set(identity)
            return await method(request)

        future = asyncio.run_coroutine_threadsafe(as_caller(), self.loop)
        try:
            response = future.result(timeout=600)
        except REQUEST_ERRORS as e:
            status, code = http_status_for(e)
            raise HttpError(status, str(e), code) from None
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            future.cancel()
            raise HttpError(504, "the request took over 600 s", "DEADLINE_EXCEEDED") from None
        except Exception:
            log.exception("HTTP %s failed", route.name)
            raise HttpError(500, "internal error; the server log has the details") from None
        self.json(h, 200, MessageToDict(response, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True))

    def read_request(self, h, message_type):
        """The request message of a JSON body: bounded, complete, UTF-8, an object, valid."""
        lengths = h.headers.get_all("Content-Length") or []
        if h.headers.get("Transfer-Encoding"):
            raise HttpError(411, "send the body with a Content-Length (no Transfer-Encoding)")
        if len({v.strip() for v in lengths}) > 1 or not all(re.fullmatch(r"[0-9]{1,19}", v.strip()) for v in lengths):
            raise HttpError(400, "Content-Length must be one non-negative integer")
        length = int(lengths[0]) if lengths else 0
        content_type = h.headers.get("Content-Type") or ""
        if (h.command == "POST" or length) and not JSON_TYPE.fullmatch(content_type.strip()):
            raise HttpError(415, "the body must be Content-Type: application/json, "
                                 f"not {shortened(content_type, 40)!r}")
        if length > self.max_request_bytes:
            raise HttpError(413, f"request body: {length} bytes, over --max-request-bytes {self.max_request_bytes}")
        try:
            data = h.rfile.read(length) if length else b""
        except TimeoutError:
            h.body_pending = False  # nothing more is coming
            raise HttpError(408, f"request body: fewer than the {length} bytes of its Content-Length arrived "
                                 f"within --http-read-timeout {self.read_timeout:g}s") from None
        h.body_pending = False
        if len(data) < length:
            raise HttpError(400, f"request body: {len(data)} bytes arrived, its Content-Length says {length}")
        try:
            body = json.loads(data.decode("utf-8")) if data else {}
        except UnicodeDecodeError as e:
            raise HttpError(400, f"request body: not UTF-8 (byte {e.start})") from None
        except RecursionError:
            raise HttpError(400, "request body: JSON nested too deeply") from None
        except ValueError as e:
            raise HttpError(400, f"request body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"request body: expected a JSON object, got {JSON_KINDS[type(body)]}")
        body = self.with_query(h, body)
        self.check_list_lengths(body)
        try:
            return ParseDict(body, message_type())
        except (ParseError, ValueError, TypeError, RecursionError) as e:
            raise HttpError(400, f"request body: {shortened(e, 300)}") from None

    @staticmethod
    def with_query(h, body: dict) -> dict:
        """The query's parameters as fields of the request (GET /api/annotators?days=7), each at
        most once and not also in the body; ParseDict reads "7" as a number, as the JSON mapping
        allows."""
        query = h.path.partition("?")[2]
        if not query:
            return body
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=64)
        except ValueError as e:
            raise HttpError(400, f"query: {shortened(e, 200)}") from None
        fields = dict(pairs)
        if len(fields) < len(pairs):
            raise HttpError(400, "query: a parameter is given more than once")
        if fields.keys() & body.keys():
            raise HttpError(400, f"query and body both set {sorted(fields.keys() & body.keys())[0]!r}")
        return {**body, **fields}

    def check_list_lengths(self, body: dict):
        """Refuse long arrays before ParseDict, which is pure Python: a few MB of [1, 1, ...]
        would hold this thread for seconds (and the GIL from the event loop). No field of the
        API's messages needs more entries than the longest limit allows."""
        longest = max(self.limits.max_stop, self.limits.max_items, self.limits.max_messages)
        todo = [("", body)]
        while todo:
            where, value = todo.pop()
            if isinstance(value, list):
                if len(value) > longest:
                    raise HttpError(400, f"{where or 'body'}: {len(value)} entries, more than any field takes "
                                         f"({longest}, the largest of --max-stop, --max-items, --max-messages)")
                todo += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
            elif isinstance(value, dict):
                todo += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]

    def refuse(self, h, route_name: str, e: HttpError):
        self.metrics.rpc_errors.labels(f"http:{route_name}", e.code).inc()
        self.reply(h, e.status, json.dumps({"code": e.code, "error": e.message}).encode(), "application/json",
                   headers=e.headers)

    def json(self, h, status: int, obj):
        self.reply(h, status, json.dumps(obj).encode(), "application/json")

    def reply(self, h, status: int, body: bytes, content_type: str, page: bool = False, headers: dict | None = None):
        h.connection.settimeout(self.read_timeout)  # the input's deadline may have passed; the reply gets its own
        h.replied = True
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        h.send_header("X-Content-Type-Options", "nosniff")
        h.send_header("X-Frame-Options", "DENY")
        h.send_header("Content-Security-Policy", PAGE_CSP if page else DATA_CSP)
        h.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":  # a reply to HEAD has no body, even a refusal's
            h.wfile.write(body)
