"""The route kie.ai calls back on: ``POST /v1/callbacks/kie`` (no bearer token).

The checks and what a valid callback does are :mod:`worker.callbacks`; this route caps the
body, answers ``401`` for every refusal without saying which check failed, and counts
callbacks in the fleet's metrics (``callbacks_total:valid``,
``callbacks_refused_total:<reason>``).
"""

from __future__ import annotations

import logging
import time

import redis
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from worker import callbacks
from worker.runtime import Services, services

logger = logging.getLogger("producers.http.callbacks")

router = APIRouter()
CALLBACK_PATH = "/v1/callbacks/kie"


class BodyTooLarge(Exception):
    pass


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refusing (:class:`BodyTooLarge`) more than ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
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
    responses={401: {"description": "refused (the reason is never given)"}, 413: {}},
    summary="Receive a signed kie.ai task callback",
    tags=["callbacks"],
)
async def kie_callback(request: Request, job_id: str | None = None) -> Response:
    svc = services()
    try:
        body = await read_capped(request, svc.settings.kie_callback_max_bytes)
    except BodyTooLarge:
        await run_in_threadpool(svc.metrics.count, "callbacks_refused_total:too_large")
        return Response(status_code=413)
    headers = dict(request.headers)
    return await run_in_threadpool(_handle, svc, body, headers, job_id)


def _handle(svc: Services, body: bytes, headers: dict[str, str], job_id: str | None) -> Response:
    try:
        verified = callbacks.verify(svc, body, headers, time.time())
        if not callbacks.claim_signature(svc, verified.signature):
            raise callbacks.CallbackRefused("replay")
    except callbacks.CallbackRefused as exc:
        return _refused(svc, exc.reason)
    try:
        outcome = callbacks.handle(svc, verified, job_id)
    except callbacks.CallbackRefused as exc:
        return _refused(svc, exc.reason)
    except redis.RedisError:
        # Not handled: let the upstream's retry (a new signature or this one) come in.
        callbacks.release_signature_quietly(svc, verified.signature)
        logger.warning("callback for task %s: Redis unavailable", verified.task_id)
        return Response(status_code=503)
    svc.metrics.count("callbacks_total:valid")
    logger.info("callback for upstream task %s: %s", verified.task_id, outcome)
    return Response(status_code=200)


def _refused(svc: Services, reason: str) -> Response:
    svc.metrics.count(f"callbacks_refused_total:{reason}")
    logger.warning("callback refused (%s)", reason)
    return Response(status_code=401)
