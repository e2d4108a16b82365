"""What every request passes before a route sees it: the bearer token and the body cap.

Both are checked in one ASGI middleware, *before* the body is read or parsed, so an
unauthenticated caller cannot make the app buffer or parse a large body, and a body over
its route's cap is refused with ``413`` after at most cap + one chunk was read.

* Bearer auth applies when ``REMIX_API_TOKENS`` is set (comma-separated; any of them is
  accepted, each compared in constant time), to every path but the public ones: the
  health probe (which shows its details only to an :func:`authorized` caller), the
  OpenAPI document and its viewers, and the upstream's callback route (the upstream
  cannot send our token; it is authenticated by its signature instead).
* The token names the caller's tenant (``svc-a:TOKEN``; a bare token, or no tokens set at
  all, is the ``default`` tenant): it is put in the request's state, where the routes read
  it (:func:`tenant_of`). A tenant never comes from anything else (docs/tenants.md).
* Caps are sized for the largest *legal* request as a JSON encoder may write it: a
  5,000-character prompt of emoji written as ``\\ud83d\\ude00`` escapes is 60 KB, its
  negative prompt 6 KB more, so one job may have :data:`JOB_BODY_MAX` and a batch of
  1,000 such requests :data:`BATCH_BODY_MAX`; the upload route, which carries image
  files, :data:`UPLOAD_BODY_MAX`. The callback route caps its own body
  (``KIE_CALLBACK_MAX_BYTES``).

The routes declare the bearer scheme too (``HTTPBearer(auto_error=False)``), so the OpenAPI
document shows it; the check itself is here.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.fields import DEFAULT_TENANT

logger = logging.getLogger("producers.http")

#: Largest body of ``POST /v1/jobs`` (worst legal case about 67 KB, plus the URLs).
JOB_BODY_MAX = 96 * 1024
#: Largest body of ``POST /v1/jobs:batch`` (1,000 requests of the worst legal case).
BATCH_BODY_MAX = 72 * 1024 * 1024
#: Largest body of ``POST /v1/jobs:upload``: a source image and a few references of up to
#: 10 MB each would not fit all at once; three of them with the form's overhead do. The
#: guard holds the body in memory before the route runs, so this bounds a request's memory.
UPLOAD_BODY_MAX = 32 * 1024 * 1024
#: Largest body of any other route (none of them reads one).
OTHER_BODY_MAX = 4 * 1024
#: At most this much of a refused body is read (and dropped) before the 413 goes out.
DRAIN_MAX = 32 * 1024 * 1024
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
#: Routes under this prefix authenticate themselves and cap their own bodies.
SELF_GUARDED_PREFIX = "/v1/callbacks/"
#: The routes that take a body, as the job routers declare them (under ``API_PREFIX``).
API_PREFIX = "/v1"
JOBS_ROUTE = f"{API_PREFIX}/jobs"
BATCH_ROUTE = f"{JOBS_ROUTE}:batch"
UPLOAD_ROUTE = f"{JOBS_ROUTE}:upload"
BODY_CAPS = {
    ("POST", JOBS_ROUTE): JOB_BODY_MAX,
    ("POST", BATCH_ROUTE): BATCH_BODY_MAX,
    ("POST", UPLOAD_ROUTE): UPLOAD_BODY_MAX,
}


def job_location(job_id: str) -> str:
    """The ``Location`` of a job just enqueued: its ``GET`` route."""
    return f"{JOBS_ROUTE}/{job_id}"


def body_cap(method: str, path: str) -> int | None:
    """The largest body a request may carry (None: the route caps it itself)."""
    if path.startswith(SELF_GUARDED_PREFIX):
        return None
    return BODY_CAPS.get((method, path.rstrip("/") or "/"), OTHER_BODY_MAX)


def needs_token(path: str) -> bool:
    return path not in PUBLIC_PATHS and not path.startswith(SELF_GUARDED_PREFIX)


#: Where the guard leaves the caller's tenant in the request's state.
TENANT_STATE = "tenant"


def token_tenant(header: str | None, tokens: Mapping[str, str]) -> str | None:
    """The tenant of the token an ``Authorization`` header carries (``tokens``: token ->
    tenant), or None when it carries none of them. Every token is compared, each in
    constant time, so the answer takes as long whichever token matched."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    given_bytes = given.strip().encode()
    found = None
    for token, tenant in tokens.items():
        if hmac.compare_digest(given_bytes, token.encode()):
            found = tenant
    return found


def caller_tenant(header: str | None, tokens: Mapping[str, str]) -> str | None:
    """The tenant of a request with this ``Authorization`` header, None when it may not use
    the guarded routes: without tokens (no auth) every caller is the default tenant."""
    return DEFAULT_TENANT if not tokens else token_tenant(header, tokens)


def authorized(header: str | None, tokens: Mapping[str, str]) -> bool:
    """Whether a request with this ``Authorization`` header may use the guarded routes:
    it carries one of ``tokens``, or there are none (no auth)."""
    return caller_tenant(header, tokens) is not None


def tenant_of(scope: Scope) -> str | None:
    """The tenant the guard found for a request (None on a public route)."""
    state = scope.get("state") or {}
    tenant = state.get(TENANT_STATE)
    return tenant if isinstance(tenant, str) else None


class BodyTooLarge(Exception):
    """``ended``: the client has sent the whole body already (nothing is left to drain)."""

    def __init__(self, ended: bool) -> None:
        self.ended = ended
        super().__init__(ended)


class GuardMiddleware:
    """Refuses unauthenticated requests (``401``) and oversized bodies (``413``).

    Parameters:
        app: the application behind it.
        tokens: returns the accepted bearer tokens, each with its tenant (empty: no auth).
    """

    def __init__(self, app: ASGIApp, tokens: Callable[[], Mapping[str, str]]) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if needs_token(path):
            tenant = caller_tenant(_header(scope, b"authorization"), self.tokens())
            if tenant is None:
                logger.info("refused %s %s: no valid bearer token", scope["method"], path)
                await _unauthorized()(scope, receive, send)
                return
            scope.setdefault("state", {})[TENANT_STATE] = tenant
        cap = body_cap(scope["method"], path)
        if cap is None:
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_capped(scope, receive, cap)
        except BodyTooLarge as exc:
            if not exc.ended:
                await _drain(receive)
            await _too_large(cap)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_capped(scope: Scope, receive: Receive, cap: int) -> bytes:
    declared = (_header(scope, b"content-length") or "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > cap:
        raise BodyTooLarge(ended=False)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body)  # the client went away: the route sees what came
        body += message.get("body", b"")
        ended = not message.get("more_body", False)
        if len(body) > cap:
            raise BodyTooLarge(ended)
        if ended:
            return bytes(body)


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a refused body (up to :data:`DRAIN_MAX`), so that a client
    still sending it reads the ``413`` rather than a connection reset."""
    drained = 0
    while drained <= DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over once, then defers to the client."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"detail": "a valid bearer token is required (Authorization: Bearer <token>)"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _too_large(cap: int) -> JSONResponse:
    return JSONResponse(
        {"detail": f"request body larger than {cap} bytes"},
        status_code=413,
        headers={"Connection": "close"},
    )
