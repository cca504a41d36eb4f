"""Which status each error gets, in one place: gRPC codes for the servicers (through the
one interceptor in server/auth.py) and HTTP statuses for the JSON API (server/http.py).

The table is read by isinstance, most specific type first, so a subclass of a listed error
gets its parent's status and no error type can slip past it. Anything not in it is a bug:
the interceptor logs it and answers INTERNAL without the traceback.
"""

from __future__ import annotations

import grpc

from rlhfkit.chat import NoChatTemplateError
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server.store import StoreError


class ServerLoadingError(RuntimeError):
    """Models are still loading."""


class StoreUnavailableError(RuntimeError):
    """An operation that needs a model store on a server started without one."""


class ModelNotFoundError(KeyError):
    """A request named a model the server does not serve."""

    def __str__(self):
        return self.args[0]


class NotFoundError(LookupError):
    """A request named something (a comparison) the server does not have."""


class ConflictError(RuntimeError):
    """The request contradicts what is stored (a second, different vote)."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


class NotEnoughModelsError(RuntimeError):
    """A server-chosen matchup needs two served policies and the server has fewer."""


class QuotaExceededError(RuntimeError):
    """The caller used up a quota of the server's (an annotator's votes for the day)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down."""


class DeadlineExceededError(RuntimeError):
    """The call's deadline passed (or it was cancelled) while the server was working on it."""


class LimitExceededError(InvalidArgumentError):
    """A request is over one of the server's limits (`--max-...`); the message names the
    field and the option. INVALID_ARGUMENT like any bad field: retrying it cannot succeed."""


class UnauthenticatedError(RuntimeError):
    """No token, or one the server does not know."""


class PermissionDeniedError(RuntimeError):
    """A known token whose role lacks the right."""


STATUS_TABLE = [
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NoChatTemplateError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotEnoughModelsError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (ServerLoadingError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
]

REQUEST_ERRORS = tuple(t for t, _ in STATUS_TABLE)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 500,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status of a request error (INTERNAL for anything the table does not know)."""
    for error_type, code in STATUS_TABLE:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def http_status_for(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, gRPC code name) of a request error, for the JSON API's replies."""
    code = status_for(exc)
    return HTTP_STATUS[code], code.name


def request_error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status, message) for a failed request: the error's own message for the table's
    errors, a generic one for a bug (its traceback goes to the server log, not the caller)."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        return code, f"internal error ({type(exc).__name__}); the server log has the details"
    return code, str(exc)
