"""The HTTP app other services use: ``uvicorn producers.http:app`` (the Procfile's ``api:``).

Routes: the jobs (:mod:`producers.http.jobs`, files as multipart uploads in
:mod:`producers.http.uploads`), the upstream's callbacks
(:mod:`producers.http.callbacks`), ``GET /healthz`` and ``GET /metrics``; the OpenAPI
document at ``/openapi.json`` (viewer at ``/docs``).

* Auth and body caps are checked before a route runs (:mod:`producers.http.guard`):
  bearer tokens from ``REMIX_API_TOKENS`` when it is set, on every route but
  ``/healthz``, the OpenAPI document and the callback route; ``/metrics`` needs a token.
  The token names the caller's tenant, and every jobs route sees only that tenant's jobs
  (docs/tenants.md).
* Any Redis error answers ``503`` with one line of JSON (and logs one line); every log
  line passes the secret-redacting filter the workers use, uvicorn's included.
* ``/healthz`` is a readiness probe: 200 ``ok`` whenever Redis answers, 503 ``degraded``
  when it does not. Anyone gets that status alone; a caller with a valid token (anyone,
  when no tokens are set) also gets the details: Redis, the long-poll subscription and
  the workers whose heartbeat is recent (host:pid), which the status does not depend on.
* ``/metrics`` exports what the whole fleet counted in Redis, read at scrape time
  (:mod:`producers.http.metrics`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import redis
import redis.asyncio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from producers.http.callbacks import router as callbacks_router
from producers.http.guard import GuardMiddleware, authorized
from producers.http.jobs import ErrorResponse, Tenant, bearer
from producers.http.jobs import router as jobs_router
from producers.http.longpoll import FinishedWatch
from producers.http.metrics import LIVE_WORKER_S, fleet_registry
from producers.http.uploads import router as uploads_router
from worker import keys
from worker.app import services
from worker.fields import DEFAULT_TENANT
from worker.logs import install_log_format
from worker.redaction import Redactor, install_log_redaction
from worker.settings import ConfigurationError, Settings, get_settings
from worker.store.connection import connect_async
from worker.store.jobs import decode_text

logger = logging.getLogger("producers.http")

#: Timeouts of the health probe's Redis calls (it never retries: it reports).
PROBE_CONNECT_TIMEOUT_S = 1.0
PROBE_TIMEOUT_S = 2.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: uvicorn's loggers other than the access log (see AccessArgsRedactor).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")
ACCESS_LOGGER = "uvicorn.access"
#: Where a setting that stops the app at start is reported (uvicorn's own log).
STARTUP_LOGGER = "uvicorn.error"


class HealthStatus(BaseModel):
    """What anyone may know: whether the app can serve."""

    status: Literal["ok", "degraded"] = Field(
        description="ok: Redis answers (200); degraded: it does not (503)."
    )


class Health(HealthStatus):
    """The details, for a caller with a valid bearer token (anyone when no tokens are set)."""

    redis: Literal["ok", "unreachable"]
    long_poll: Literal["live", "reconnecting"] = Field(
        description="Whether the subscription that ends long polls at once is up."
    )
    workers_live: int | None = Field(
        description=f"Worker processes with a heartbeat in the last {LIVE_WORKER_S:g} s."
    )
    workers: list[str] = Field(description="Their names (host:pid).")
    detail: str | None = None


class HealthProbe:
    """Redis reachability and live workers, with short timeouts and no retries."""

    def __init__(self, settings: Settings) -> None:
        self.backend = _probe_client(settings.backend_url)
        self.broker = (
            self.backend
            if settings.redis_url == settings.backend_url
            else _probe_client(settings.redis_url)
        )

    async def reachable(self) -> None:
        """Ping the Redis servers; raises a RedisError if one is unreachable."""
        await self.backend.ping()
        if self.broker is not self.backend:
            await self.broker.ping()

    async def live_workers(self) -> list[str]:
        """Names of the workers with a recent heartbeat; raises a RedisError if unreachable."""
        await self.backend.ping()
        seconds, micros = await self.backend.time()  # heartbeats are on this clock
        now = seconds + micros / 1e6
        raw = await self.broker.zrangebyscore(keys.WORKERS, now - LIVE_WORKER_S, "+inf")
        return sorted(decode_text(name) for name in raw)

    async def close(self) -> None:
        await self.backend.aclose()
        if self.broker is not self.backend:
            await self.broker.aclose()


def _probe_client(url: str) -> redis.asyncio.Redis:
    return connect_async(
        url,
        socket_connect_timeout=PROBE_CONNECT_TIMEOUT_S,
        socket_timeout=PROBE_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


class AccessArgsRedactor(logging.Filter):
    """Redacts the arguments of uvicorn's access log lines one by one.

    Its formatter unpacks ``record.args`` (client, method, path, ...), so they must stay a
    tuple; the workers' :class:`~worker.redaction.RedactingFilter` folds them into the
    message instead, which suits every other logger.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor and isinstance(record.args, tuple):
            record.args = tuple(
                self.redactor.redact(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def setup_logging(redactor: Redactor) -> None:
    """Log to stderr when nobody configured logging; redact secrets from every line.

    The job fields and the format (JSON with ``REMIX_LOG_JSON``) go on before the redacting
    filters, so those see (and redact) the fields too.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    uvicorn_loggers = [logging.getLogger(name) for name in UVICORN_LOGGERS]
    access_logger = logging.getLogger(ACCESS_LOGGER)
    install_log_format(get_settings().remix_log_json, [*uvicorn_loggers, access_logger])
    install_log_redaction(redactor, uvicorn_loggers)
    for access in logging.getLogger(ACCESS_LOGGER).handlers:
        if not any(isinstance(f, AccessArgsRedactor) for f in access.filters):
            access.addFilter(AccessArgsRedactor(redactor))


class SettingsCheck:
    """Stops the app at start, with one log line, when a setting is invalid.

    An exception in the lifespan would make the server log its traceback; this answers the
    startup with a failure of its own instead, so the log shows the one-line error
    (:class:`~worker.settings.ConfigurationError` names the setting, never a secret).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                get_settings()
            except ConfigurationError as exc:
                await receive()  # lifespan.startup
                logging.getLogger(STARTUP_LOGGER).error("%s", exc)
                await send({"type": "lifespan.startup.failed", "message": ""})
                return
        await self.app(scope, receive, send)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()  # checked already by SettingsCheck
    setup_logging(services().redactor)
    if not settings.api_tokens():
        logger.warning("REMIX_API_TOKENS is not set: the jobs API needs no token")
    watch = FinishedWatch(settings.backend_url)
    watch.start()
    app.state.finished_watch = watch
    app.state.health = HealthProbe(settings)
    try:
        yield
    finally:
        await watch.stop()
        await app.state.health.close()


#: Reads Redis only when scraped.
METRICS_REGISTRY = fleet_registry()

app = FastAPI(
    title="remixq",
    version="1",
    summary="Image remix jobs on kie.ai's ideogram/character-remix, for other services.",
    lifespan=lifespan,
)
app.add_middleware(GuardMiddleware, tokens=lambda: get_settings().api_token_tenants())
app.add_middleware(SettingsCheck)
app.include_router(jobs_router)
app.include_router(uploads_router)
app.include_router(callbacks_router)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's ``422``, without echoing the input (a bad batch may be megabytes)."""
    return JSONResponse({"detail": [_field_error(e) for e in exc.errors()]}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # FastAPI answers 400 for a body it could not parse other than by a JSON syntax error
    # (bytes that are not UTF-8, nesting deeper than Python's recursion limit); the app
    # raises no 400 itself. Answer it like any other body that is not JSON.
    if exc.status_code == 400 and exc.__cause__ is not None:
        error = {"type": "json_invalid", "loc": ["body"], "msg": "the body is not valid JSON"}
        return JSONResponse({"detail": [error]}, status_code=422)
    return await http_exception_handler(request, exc)


def _field_error(error: Any) -> dict[str, Any]:
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "is not a known field"
    return {"type": error.get("type"), "loc": list(error.get("loc", ())), "msg": message}


@app.exception_handler(redis.RedisError)
async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("%s %s: Redis unavailable (%s)", request.method, request.url.path, exc)
    return JSONResponse({"detail": "Redis is unavailable; try again later"}, status_code=503)


@app.get(
    "/healthz",
    response_model=Health | HealthStatus,
    tags=["operations"],
    summary="Readiness: Redis reachable; details (workers, ...) with a valid token",
    responses={503: {"model": Health | HealthStatus, "description": "Redis is unreachable"}},
    # The token is optional: without it (or with a wrong one) the status comes alone.
    openapi_extra={"security": [{}, {bearer.scheme_name: []}]},
)
async def healthz(request: Request) -> Health | HealthStatus | JSONResponse:
    probe: HealthProbe = request.app.state.health
    if not authorized(request.headers.get("authorization"), get_settings().api_token_tenants()):
        return await _public_health(probe)
    watch: FinishedWatch = request.app.state.finished_watch
    long_poll: Literal["live", "reconnecting"] = "live" if watch.live else "reconnecting"
    try:
        workers = await probe.live_workers()
    except (redis.RedisError, OSError) as exc:
        logger.warning("health check: Redis unreachable (%s)", exc)
        down = Health(
            status="degraded",
            redis="unreachable",
            long_poll=long_poll,
            workers_live=None,
            workers=[],
            detail="Redis is unreachable",
        )
        return JSONResponse(down.model_dump(), status_code=503)
    return Health(
        status="ok", redis="ok", long_poll=long_poll, workers_live=len(workers), workers=workers
    )


async def _public_health(probe: HealthProbe) -> HealthStatus | JSONResponse:
    try:
        await probe.reachable()
    except (redis.RedisError, OSError) as exc:
        logger.warning("health check: Redis unreachable (%s)", exc)
        return JSONResponse(HealthStatus(status="degraded").model_dump(), status_code=503)
    return HealthStatus(status="ok")


#: What another tenant's token gets from ``/metrics``.
OPERATOR_ONLY = (
    "the fleet's metrics are the operator's: use a token of tenant default (a bare token)"
)


@app.get(
    "/metrics",
    tags=["operations"],
    summary="The fleet's metrics, Prometheus text format",
    dependencies=[Depends(bearer)],
    response_class=Response,
    responses={
        200: {
            "description": "counters, gauges and histograms of the whole fleet",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        401: {"model": ErrorResponse, "description": "no valid bearer token"},
        403: {"model": ErrorResponse, "description": "a token of another tenant than default"},
        503: {"model": ErrorResponse, "description": "Redis is unavailable"},
    },
)
async def metrics(tenant: Tenant) -> Response:
    # The fleet's metrics name every tenant and the size of its line: the operator's.
    if tenant != DEFAULT_TENANT:
        raise HTTPException(403, OPERATOR_ONLY)
    body = await run_in_threadpool(generate_latest, METRICS_REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
