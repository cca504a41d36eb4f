"""Who may call what: bearer tokens with roles, and the one gRPC interceptor that enforces
them, refuses undecodable request bytes, and turns request errors into statuses.

The tokens file (`rlhfkit serve --auth-tokens FILE`, ARCHITECTURE.md "Access and
transport") is a JSON object {"TOKEN": {"name": "ann-7", "role": "annotator"}, ...}. It is
read at start and again when it changes on disk (checked at most once a second); a file that
stops parsing keeps the last good tokens and logs why. Tokens are compared in constant time
and never logged.

Roles, each including the one before: `client` (generate, score, log-probs, list models,
create comparisons, read the leaderboard), `annotator` (+ votes, recorded under the token's
name), `admin` (+ SetRole, paths in ListModels and errors). Health and reflection are open.
Without a tokens file every caller may do everything (the server binds loopback by default).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server.errors import PermissionDeniedError, UnauthenticatedError, request_error_status

log = logging.getLogger(__name__)

ROLES = ("client", "annotator", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
# The role each RPC needs; a method of ours not listed needs admin (a new RPC is closed until
# someone decides who may call it).
GRPC_ROLES = {
    "/rlhfkit.v1.Generation/Generate": "client",
    "/rlhfkit.v1.Generation/GenerateStream": "client",
    "/rlhfkit.v1.Reward/Score": "client",
    "/rlhfkit.v1.Reward/Compare": "client",
    "/rlhfkit.v1.Reward/LogProbs": "client",
    "/rlhfkit.v1.Models/ListModels": "client",
    "/rlhfkit.v1.Models/SetRole": "admin",
    "/rlhfkit.v1.Feedback/CreateComparison": "client",
    "/rlhfkit.v1.Feedback/GetLeaderboard": "client",
    "/rlhfkit.v1.Feedback/SubmitVote": "annotator",
    "/rlhfkit.v1.Feedback/GetAnnotators": "admin",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Identity:
    name: str
    role: str


# Code that runs outside a checked request sees this caller, which has no rights.
NO_CALLER = Identity("", "")
# The caller of the request being served: its Identity, or None on a server without tokens.
# Set by the gRPC interceptor and by the HTTP side before they run a servicer method.
caller: contextvars.ContextVar["Identity | None"] = contextvars.ContextVar("rlhfkit_caller", default=NO_CALLER)


def is_admin(identity: Identity | None) -> bool:
    """Admin rights: an admin token, or any caller of a server without tokens."""
    return identity is None or identity.role == "admin"


def bearer_token(authorization: str | None) -> str:
    """The TOKEN of an `authorization: Bearer TOKEN` value; UnauthenticatedError otherwise."""
    if not authorization:
        raise UnauthenticatedError("no token: send the header 'authorization: Bearer TOKEN' "
                                   "(rlhfkit CLI: --token or RLHFKIT_TOKEN)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError("the authorization header must be 'Bearer TOKEN'")
    return token.strip()


def is_loopback(host: str) -> bool:
    """Whether an address is reachable only from this machine (binding it needs no tokens)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, where: str) -> dict[bytes, Identity]:
    """{sha256(token): Identity} from a tokens file's text; errors name the entry."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f'{where}: expected a JSON object {{"TOKEN": {{"name": ..., "role": ...}}}}')
    tokens = {}
    for n, (token, entry) in enumerate(raw.items()):
        label = f"{where}: entry {n + 1}"  # never the token itself
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{label}: a token must be at least {MIN_TOKEN_CHARS} characters "
                             "(rlhfkit tokens add makes one)")
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f'{label}: expected {{"name": NON-EMPTY TEXT, "role": ...}}')
        if entry.get("role") not in ROLES:
            raise ValueError(f"{label} ({entry['name']}): role must be one of {', '.join(ROLES)}, "
                             f"got {entry.get('role')!r}")
        tokens[_digest(token)] = Identity(entry["name"], entry["role"])
    return tokens


class Tokens:
    """The tokens file, re-read when it changes."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._checked = 0.0
        self._tokens = self._read()  # a bad file at start is an error at start

    def _read(self) -> dict[bytes, Identity]:
        stat = self.path.stat()
        tokens = parse_tokens(self.path.read_text(encoding="utf-8"), f"--auth-tokens {self.path}")
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        return tokens

    def _maybe_reload(self):
        """Re-read a changed file (at most once a second, by one thread; the others go on with
        the tokens they have). A file that no longer parses keeps the last good tokens (and is
        reported once); a deleted or unreadable one revokes every token: failing closed."""
        if time.monotonic() - self._checked < 1.0 or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = time.monotonic()
            try:
                stat = self.path.stat()
            except OSError as e:
                if self._tokens:
                    log.warning("%s is gone (%s): every token is refused until it is back", self.path, e)
                self._tokens, self._stamp = {}, None
                return
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp != self._stamp:
                try:
                    self._tokens = self._read()
                    log.info("re-read %s: %d tokens", self.path, len(self._tokens))
                except (OSError, ValueError) as e:
                    self._stamp = stamp  # reported once, not every second
                    log.warning("kept the previous tokens: %s", e)
        finally:
            self._lock.release()

    def identify(self, authorization: str | None) -> Identity:
        """The caller of an `authorization: Bearer TOKEN` value; UnauthenticatedError otherwise."""
        token = bearer_token(authorization)
        self._maybe_reload()
        digest = _digest(token)
        found = None
        for known, identity in self._tokens.items():  # every entry compared: the time says nothing
            if hmac.compare_digest(known, digest):
                found = identity
        if found is None:
            raise UnauthenticatedError("unknown token")
        return found


def authorize(identity: Identity | None, needed: str, what: str):
    """PermissionDeniedError unless the caller's role includes `needed` (None: open server)."""
    if identity is not None and RANK[identity.role] < RANK[needed]:
        raise PermissionDeniedError(f"{what} needs the {needed} role; {identity.name} has {identity.role}")


def read_tokens_file(path: str, missing_ok: bool = False) -> dict:
    """The tokens file's JSON object as written (token -> entry), checked as the server checks
    it; an empty file (or, with missing_ok, a missing one) is {}."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() or not missing_ok else ""
    raw = json.loads(text) if text.strip() else {}
    parse_tokens(json.dumps(raw), str(p))  # a file the server would refuse is reported, not edited
    return raw


def write_tokens_file(path: str, raw: dict):
    """The tokens file rewritten whole: mode 0600, replaced at once, so the server never reads
    half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokens-")  # a new file, mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_token(path: str, name: str, role: str) -> str:
    """A new random token for (name, role), added to the tokens file (created if missing)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name:
        raise ValueError("name is empty: say who the token is for")
    raw = read_tokens_file(path, missing_ok=True)
    token = secrets.token_urlsafe(32)
    raw[token] = {"name": name, "role": role}
    write_tokens_file(path, raw)
    return token


def remove_token(path: str, name: str) -> int:
    """Revoke every token of `name`; how many there were (0: the file is unchanged)."""
    raw = read_tokens_file(path)
    kept = {t: e for t, e in raw.items() if e["name"] != name}
    if len(kept) < len(raw):
        write_tokens_file(path, kept)
    return len(raw) - len(kept)


class _Malformed:
    """What the deserializer returns for bytes that are not the request message."""

    def __init__(self, error: str):
        self.error = error


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, or anything a broken payload raises
            return _Malformed(str(e) or type(e).__name__)
    return deserialize


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC of ours goes through here: the caller is identified (when the server has
    tokens) and checked against GRPC_ROLES, undecodable bytes get INVALID_ARGUMENT, and the
    request errors the servicers raise become statuses by server/errors.py's table, counted
    in rlhfkit:rpc_errors_total. Health and reflection pass untouched."""

    def __init__(self, tokens: Tokens | None, metrics):
        self.tokens = tokens
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        identity, refusal = None, None
        if self.tokens is not None:
            metadata = dict(details.invocation_metadata or ())
            try:
                identity = self.tokens.identify(metadata.get("authorization"))
                authorize(identity, GRPC_ROLES.get(details.method, "admin"), method)
            except (UnauthenticatedError, PermissionDeniedError) as e:
                refusal = e
        fail = self.fail

        def admit(request):
            """Raise the refusal of a call that may not go on; else make its caller known."""
            if refusal is not None:
                raise refusal
            if isinstance(request, _Malformed):
                raise InvalidArgumentError("request", f"the bytes are not a valid {method} request message "
                                           f"({request.error})")
            caller.set(identity)

        async def guarded(request, context):
            try:
                admit(request)
                return await handler.unary_unary(request, context)
            except Exception as e:
                await fail(context, method, e)

        async def guarded_stream(request, context):
            try:
                admit(request)
                async for item in handler.unary_stream(request, context):
                    yield item
            except Exception as e:
                await fail(context, method, e)

        # An unauthenticated call's payload is never parsed.
        deserializer = (lambda data: None) if refusal is not None else _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(guarded, deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(guarded_stream, deserializer, handler.response_serializer)
        return handler  # no client-streaming RPCs in rlhfkit.v1

    async def fail(self, context, method: str, exc: Exception):
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the servicer already set its status
        code, message = request_error_status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=exc)
        self.metrics.rpc_errors.labels(method, code.name).inc()
        await context.abort(code, message)
