"""One request to `lmlab serve`: what it may ask of the server (Limits), how the server refuses it (ApiError, in
OpenAI's error format), and the checks of a body that every route shares: JSON by media type, within a size, nested
at most MAX_JSON_DEPTH deep, its numbers and choices within bounds. The guard, the run set and the routes all refuse
with ApiError, so it sits here, below them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from starlette.requests import Request

from ..common import MAX_JSON_DEPTH, LmlabError, json_depth, parse_json  # noqa: F401 - the one JSON bound



@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; going over a limit is answered with a 4xx, never a slow server."""

    max_tokens: int = 512
    """Tokens one completion may generate."""
    max_prompt_chars: int = 20_000
    """Characters in the prompts of one request (and in a text to score)."""
    max_concurrent: int = 4
    """Requests running a model at the same time (completions, next-token views, surprisal); one more is refused
    with 429."""


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(ApiError):
    """Raised inside work whose client hung up, so the work stops; the answer (nginx's 499) reaches nobody."""

    def __init__(self):
        super().__init__(499, "the client closed the request", code="client_closed_request")


def number_param(body: dict, name: str, default, low: float, high: float, integer: bool = False,
                 low_open: bool = False):
    """body[name], a number (an integer if asked) from low to high, or `default` when absent; else an ApiError."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not (low < value if low_open else low <= value) or not value <= high:
        low_text = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise ApiError(400, f"{name} must be {low_text} and at most {high:g}, got {value!r}", name)
    return value


def choice_param(body: dict, name: str, kinds: type | tuple, default, what: str):
    """body[name], of the type(s) `kinds` (`what` says which in words), or `default` when absent; else an ApiError."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kinds is bool) or not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {what}, got {value!r}", name)
    return value


def check_length(name: str, chars: int, limits: Limits) -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(413, f"the {name} has {chars:,} characters; this server takes at most "
                            f"{limits.max_prompt_chars:,} (lmlab serve --max-prompt-chars)", name, "prompt_too_long")


def is_json_media_type(content_type: str) -> bool:
    """Whether a Content-Type header says JSON: the media type before any parameters is application/json, and a
    charset, if given, is UTF-8. A substring test would pass text/plain;charset=application/json, which a page
    from any site may POST without the browser asking the server first."""
    media_type, *params = content_type.split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The JSON body of a request, refused when it is not JSON, larger than max_bytes or nested too deep."""
    if not is_json_media_type(request.headers.get("content-type", "")):
        raise ApiError(415, "send the request body as JSON (Content-Type: application/json)")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes:,} bytes", code="request_too_large")
        parts.append(part)
    try:
        return parse_json(b"".join(parts), "the request body")
    except LmlabError as e:
        raise ApiError(400, str(e), code="invalid_json") from None
