"""The route kie.ai calls back on: ``POST /v1/callbacks/kie`` (no bearer token).

The checks and what a valid callback does are :mod:`worker.policies.callbacks`; this route caps the
body (``413`` over ``KIE_CALLBACK_MAX_BYTES``, counted or chunked), answers ``401`` for
every refusal without saying which check failed, ``503`` when the callback cannot be
handled now (so that the upstream delivers it again). Callbacks with a valid signature are
counted in the fleet's metrics in Redis (``callbacks_total:valid``,
``callbacks_refused_total:<reason>``, ``callbacks_unavailable_total``); refusals of the
others, anyone's noise, only in this process's memory and at DEBUG in the log, so that a
flood of them costs no Redis work. It needs no bearer token: the upstream cannot send one;
the signature is the authentication.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Annotated

import redis
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from producers.http.metrics import PROCESS_COUNTERS
from worker.app import services
from worker.policies import callbacks
from worker.services import Services

logger = logging.getLogger("producers.http.callbacks")

router = APIRouter()
CALLBACK_PATH = "/v1/callbacks/kie"
REFUSED = "callbacks_refused_total:"


class BodyTooLarge(Exception):
    pass


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refusing (:class:`BodyTooLarge`) more than ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


@router.post(
    CALLBACK_PATH,
    status_code=200,
    response_class=Response,
    responses={
        200: {"description": "acted on (or known already); no body"},
        401: {"description": "refused (the reason is never given)"},
        413: {"description": "the body is over KIE_CALLBACK_MAX_BYTES"},
        503: {"description": "not handled now (Redis or the upstream away): deliver it again"},
    },
    summary="Receive a signed kie.ai task callback",
    tags=["callbacks"],
)
async def kie_callback(
    request: Request,
    job_id: Annotated[
        str | None,
        Query(description="The job the task was created for (added to KIE_CALLBACK_URL)."),
    ] = None,
) -> Response:
    """kie.ai's callback for a finished task, signed with ``KIE_WEBHOOK_HMAC_KEY``
    (headers ``X-Webhook-Timestamp``, ``X-Webhook-Signature``). No bearer token."""
    svc = services()
    try:
        body = await read_capped(request, svc.settings.kie_callback_max_bytes)
    except BodyTooLarge:
        _count_unsigned("too_large")
        return Response(status_code=413)
    return await run_in_threadpool(respond, svc, body, dict(request.headers), job_id)


def respond(svc: Services, body: bytes, headers: Mapping[str, str], job_id: str | None) -> Response:
    """Answer one callback whose body was read: ``200`` acted on, ``401`` refused (for any
    reason, never said), ``503`` not handled now (Redis or the upstream away), so that the
    upstream delivers it again; a delivery answered 503 gives its signature back."""
    now = time.time()
    try:
        verified = callbacks.verify(svc, body, headers, now)
    except callbacks.CallbackRefused as exc:
        _count_unsigned(exc.reason)
        return Response(status_code=401)
    try:
        with callbacks.claimed(svc, verified, now):
            outcome = callbacks.handle(svc, verified, job_id)
    except callbacks.CallbackRefused as exc:
        return _refused(svc, exc.reason)
    except (redis.RedisError, callbacks.CallbackUnavailable) as exc:
        logger.warning("callback for upstream task %s not handled now: %s", verified.task_id, exc)
        svc.metrics.count("callbacks_unavailable_total")
        return Response(status_code=503)
    svc.metrics.count("callbacks_total:valid")
    logger.info("callback for upstream task %s: %s", verified.task_id, outcome)
    return Response(status_code=200)


def _refused(svc: Services, reason: str) -> Response:
    """A callback with a valid signature refused: worth a look."""
    svc.metrics.count(f"{REFUSED}{reason}")
    logger.warning("callback refused (%s)", reason)
    return Response(status_code=401)


def _count_unsigned(reason: str) -> None:
    """A callback without a valid signature refused: in this process's memory, no Redis."""
    PROCESS_COUNTERS.count(f"{REFUSED}{reason}")
    logger.debug("callback refused (%s)", reason)
