"""``remixq sandbox`` / ``python -m sandbox``: serve the kie.ai stand-in in the foreground."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any, get_args

import click
from pydantic import ValidationError

from sandbox.config import (
    DEFAULT_API_KEY,
    Endpoint,
    FaultStyle,
    SandboxConfig,
    describe_error,
)
from sandbox.server import DEFAULT_HOST, SandboxServer, loopback_host

DEFAULT_PORT = 8090
DEFAULTS = SandboxConfig()
PROBABILITY = click.FloatRange(0.0, 1.0)
SECONDS = click.FloatRange(min=0.0)


def _host(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return loopback_host(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _faults(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[int, float]:
    """``("429=0.2", "500=0.05")`` -> ``{429: 0.2, 500: 0.05}``."""
    faults: dict[int, float] = {}
    for item in values:
        code_text, _, probability_text = item.partition("=")
        try:
            code, probability = int(code_text), float(probability_text)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not CODE=P (e.g. 429=0.2)") from None
        faults[code] = probability
    return faults


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


@click.command("sandbox")
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    callback=_host,
    help="Loopback address to listen on.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--api-key",
    envvar="SANDBOX_API_KEY",
    default=DEFAULT_API_KEY,
    show_default=True,
    help="The Bearer key clients must send (env SANDBOX_API_KEY).",
)
@click.option(
    "--generation-seconds",
    type=SECONDS,
    default=DEFAULTS.generation_seconds,
    show_default=True,
    help="Time from createTask to the final state.",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="CODE=P",
    callback=_faults,
    help="Answer code 429, 455 or 500 with probability P (repeatable).",
)
@click.option(
    "--fault-endpoint",
    "fault_endpoints",
    multiple=True,
    type=click.Choice(get_args(Endpoint)),
    help="Endpoints random faults hit (repeatable; default all).",
)
@click.option(
    "--fault-style",
    type=click.Choice(get_args(FaultStyle)),
    default=DEFAULTS.fault_style,
    show_default=True,
    help="http: HTTP status = code; body: HTTP 200 with the code; page: HTTP status = code "
    "with an HTML or text page; mixed: any of these.",
)
@click.option(
    "--reset-rate",
    type=PROBABILITY,
    default=DEFAULTS.reset_rate,
    show_default=True,
    help="Probability of resetting the connection without an answer.",
)
@click.option(
    "--html-rate",
    type=PROBABILITY,
    default=DEFAULTS.html_rate,
    show_default=True,
    help="Probability of an HTML 502 page from a broken gateway.",
)
@click.option(
    "--slow-rate",
    type=PROBABILITY,
    default=DEFAULTS.slow_rate,
    show_default=True,
    help="Probability of a delayed answer.",
)
@click.option("--slow-seconds", type=SECONDS, default=DEFAULTS.slow_seconds, show_default=True)
@click.option(
    "--cut-rate",
    type=PROBABILITY,
    default=DEFAULTS.cut_rate,
    show_default=True,
    help="Probability of sending the headers and half the body, then closing.",
)
@click.option(
    "--drop-rate",
    type=PROBABILITY,
    default=DEFAULTS.drop_rate,
    show_default=True,
    help="Probability of creating a task, then resetting the connection instead of answering.",
)
@click.option(
    "--gateway-rate",
    type=PROBABILITY,
    default=DEFAULTS.gateway_rate,
    show_default=True,
    help="Probability of creating a task, then answering a gateway's HTML 504 page.",
)
@click.option(
    "--trickle-rate",
    type=PROBABILITY,
    default=DEFAULTS.trickle_rate,
    show_default=True,
    help="Probability of sending the body one byte at a time.",
)
@click.option(
    "--trickle-seconds",
    type=SECONDS,
    default=DEFAULTS.trickle_seconds,
    show_default=True,
    help="Wait before each byte of a trickled body.",
)
@click.option(
    "--rate-limit",
    metavar="N/Ss",
    help="createTask budget per key, e.g. 20/10s; excess is answered 429 and dropped.",
)
@click.option(
    "--retry-after",
    metavar="VALUE",
    help="Retry-After header of every 429, sent verbatim (e.g. 86400, inf, an HTTP date).",
)
@click.option(
    "--credits",
    type=click.IntRange(min=0),
    help="Credit balance; each task costs 1, at 0 createTask answers 402. Unlimited when unset.",
)
@click.option("--maintenance", is_flag=True, help="Answer 455 to everything (maintenance).")
@click.option(
    "--webhook-hmac-key",
    envvar="SANDBOX_WEBHOOK_HMAC_KEY",
    help="Sign callbacks with this key (env SANDBOX_WEBHOOK_HMAC_KEY).",
)
@click.option("--seed", type=int, help="Seed of the fault RNG, for repeatable runs.")
@click.option(
    "--relay-mode",
    type=click.Choice(["sync", "async"]),
    default=DEFAULTS.relay_mode,
    show_default=True,
    help="The legacy remix relay answers with the images (sync) or a task id (async).",
)
@click.option(
    "--relay-api-key",
    envvar="SANDBOX_RELAY_API_KEY",
    help="The relay's Bearer key (env SANDBOX_RELAY_API_KEY); default: --api-key.",
)
def sandbox_command(host: str, port: int, **settings: Any) -> None:
    """Serve a local stand-in for the kie.ai API, with fault injection."""
    if not settings["fault_endpoints"]:
        del settings["fault_endpoints"]
    try:
        config = SandboxConfig(**settings)
    except ValidationError as exc:
        raise click.UsageError(describe_error(exc)) from None
    try:
        server = SandboxServer(config, host=host, port=port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    key_hint = config.api_key if config.api_key == DEFAULT_API_KEY else "<your --api-key>"
    click.echo(
        f"kie.ai sandbox on {server.url} - use KIE_BASE_URL={server.url} "
        f"KIE_UPLOAD_BASE_URL={server.url} KIE_API_KEY={key_hint}"
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("sandbox stopped")
