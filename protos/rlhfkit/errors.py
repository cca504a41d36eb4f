"""The one error type for a bad request field, shared by the kernels' SamplingParams, the
chat renderer and the server: it names the field, and the server turns it into
INVALID_ARGUMENT (gRPC) or 400 (HTTP) with the message as given."""

from __future__ import annotations


class InvalidArgumentError(ValueError):
    """A field of a request is bad; `field` names it and the message starts with it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def shortened(text: str, limit: int = 64) -> str:
    """`text` as an error message may echo it: at most `limit` characters, with the length of
    what was cut, so a 20,000-character name cannot overflow a status message."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
