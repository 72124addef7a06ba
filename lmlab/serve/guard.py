"""Guarding `lmlab serve`: who may call its API (no page of another site, the API key when one is set) and who may
reach it at all (the host names it answers to; a server reachable from other machines needs a key).
Everything but the page itself (/ and /static) is refused to other web sites, and needs the API key when one is set.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Optional
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..common import LmlabError
from .request import ApiError

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]"]  # the Host names a loopback server answers to


def origin_matches_host(origin: str, host: Optional[str], scheme: str = "http") -> bool:
    """Whether an Origin header names the server the request was sent to: the request's scheme and the host name
    and port of its Host header, a missing port being the scheme's default. "null" (sandboxed frames, local files)
    never matches."""
    try:
        o, h = urlsplit(origin), urlsplit("//" + (host or ""))
        default = {"http": 80, "https": 443}.get(scheme)
        if o.scheme != scheme or not o.hostname or "@" in o.netloc + h.netloc or o.path not in ("", "/"):
            return False
        return o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:  # a port that is not a number
        return False


def cross_site_refusal(headers: Headers, scheme: str = "http") -> Optional[ApiError]:
    """Why a request looks sent by a page of another site, if it does. Browsers say where a request comes from
    (Sec-Fetch-Site, Origin); programs such as curl or the openai client send neither and pass."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        why = f"Sec-Fetch-Site: {site}"
    elif "origin" in headers and not origin_matches_host(headers["origin"], headers.get("host"), scheme):
        why = f"Origin {headers['origin']} is not this server"
    else:
        return None
    return ApiError(403, f"cross-site requests are refused ({why}); this API answers its own page and programs",
                    code="cross_site_request", kind="permission_error")


def bearer_matches(authorization: Optional[str], api_key: str) -> bool:
    scheme, _, token = (authorization or "").strip().partition(" ")
    # compare_digest takes as long whatever the first wrong character, so timing does not leak the key
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiGuard:
    """ASGI middleware in front of everything but the page itself (/ and /static/*, which carry no data and which
    a link from anywhere may open): refuses cross-site requests with 403, then, when the server has an API key,
    requests without `Authorization: Bearer KEY` with 401."""

    def __init__(self, app, api_key: Optional[str] = None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and not (path == "/" or path.startswith("/static/")):
            headers = Headers(scope=scope)
            error = cross_site_refusal(headers, scope.get("scheme", "http"))
            if error is None and self.api_key is not None and not bearer_matches(headers.get("authorization"),
                                                                                 self.api_key):
                error = ApiError(401, "this server needs its API key: send the header Authorization: Bearer KEY "
                                      "(the openai client: OpenAI(api_key=KEY))", code="invalid_api_key")
            if error is not None:
                extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                await JSONResponse(error.body(), error.status, headers=extra)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def allowed_host_names(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The Host header names the server answers to: a loopback server's own names, else the address it listens
    on; plus the names given with --allowed-host. Any other name is a page that rebound a DNS name to us."""
    own = [f"[{host}]" if ":" in host else host] + (LOOPBACK_NAMES if is_loopback(host) else [])
    names = [n.strip().lower() for n in (*own, *extra)]
    return list(dict.fromkeys(n for n in names if n))


def check_exposure(host: str, api_key: Optional[str], extra_hosts: list[str] | tuple[str, ...]) -> None:
    """Refuse, with an LmlabError, settings that would serve the runs to other machines unguarded or unusable."""
    if api_key is not None and (not api_key or not api_key.isascii() or not api_key.isprintable()
                                or api_key.strip() != api_key):
        raise LmlabError("--api-key must be printable ASCII, not empty, without leading or trailing spaces")
    if is_loopback(host):
        return
    if api_key is None:
        raise LmlabError(f"--host {host} can be reached from other machines; set a key they must send with "
                         f"--api-key KEY (or the environment variable LMLAB_API_KEY)")
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard and not extra_hosts:
        raise LmlabError(f"--host {host} listens on every address; name the host names clients use to reach it "
                         f"with --allowed-host NAME (one option per name)")
