"""``provisiond hub monitor-events``, ``send-c2d`` and ``invoke-method``: the built-in hubs'
telemetry, cloud-to-device messages and direct methods, through provisiond's admin API
(:mod:`provisiond.service.hub_ops`). Added to the ``hub`` group by :mod:`provisiond.cli.manage`.

``monitor-events`` prints what ``az iot hub monitor-events`` prints: one JSON document per event,
``{"event": {"origin": deviceId, "module": ..., "payload": ...}}``, the payload decoded as
JSON when it is JSON (else as text, else base64), with ``properties`` (``system``,
``application``) and ``annotations`` when ``--properties`` asks for them.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from pathlib import Path
from typing import Any

import click

from ..hub.events import StoredEvent
from ..hub.methods import (
    DEFAULT_RESPONSE_TIMEOUT,
    MAX_CONNECT_TIMEOUT,
    MAX_RESPONSE_TIMEOUT,
    MIN_RESPONSE_TIMEOUT,
)
from ..service_client import ServiceClient
from ._common import CONTEXT, builtin_hub, connected, echo_json, json_option, print_fields

__all__ = ["invoke_method", "monitor_events", "send_c2d"]

_PROPERTY_KINDS = ("sys", "app", "anno", "all")


def _payload(event: StoredEvent) -> Any:
    """The body as ``az`` shows it: JSON when it is JSON, else text, else base64."""
    encoding = event.system_properties.get("content-encoding", "utf-8") or "utf-8"
    try:
        text = event.body.decode(encoding if encoding.lower() in ("utf-8", "utf8", "ascii") else "utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(event.body).decode("ascii")}
    try:
        return json.loads(text)
    except ValueError:
        return text


def event_document(event: StoredEvent, kinds: tuple[str, ...]) -> dict[str, Any]:
    """What ``monitor-events`` prints for one event (az's shape)."""
    wanted = set(_PROPERTY_KINDS[:3]) if "all" in kinds else set(kinds)
    doc: dict[str, Any] = {
        "origin": event.device_id,
        "module": event.module_id or "",
        "payload": _payload(event),
    }
    if wanted & {"sys", "app"}:
        properties: dict[str, Any] = {}
        if "sys" in wanted:
            properties["system"] = event.system_properties
        if "app" in wanted:
            properties["application"] = event.properties
        doc["properties"] = properties
    if "anno" in wanted:
        doc["annotations"] = {
            "iothub-connection-device-id": event.device_id,
            **({"iothub-connection-module-id": event.module_id} if event.module_id else {}),
            "iothub-enqueuedtime": event.enqueued_time,
            "x-opt-sequence-number": event.seq,
        }
    return {"event": doc}


@click.command("monitor-events", context_settings=CONTEXT)
@click.option("--hub", metavar="HOST", help="The built-in hub [default: the first built-in hub].")
@click.option("--device-id", "-d", metavar="ID", help="Only this device's events.")
@click.option(
    "--properties",
    "--props",
    "kinds",
    type=click.Choice(_PROPERTY_KINDS),
    multiple=True,
    help="Also print system properties (sys), application properties (app), annotations (anno) "
    "or all of them (repeatable).",
)
@click.option(
    "--timeout",
    "-t",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Stop after this many seconds without an event (0: never).",
)
@click.option(
    "--enqueued-time",
    "-e",
    metavar="TIME",
    help="Start with the events stored from TIME on (ISO 8601, or Unix time in milliseconds) "
    "[default: only those arriving from now on].",
)
@click.option(
    "--after",
    type=click.IntRange(min=0),
    metavar="SEQ",
    help="Start after the event with this sequence number (x-opt-sequence-number), e.g. to resume.",
)
@click.option("--max-events", type=click.IntRange(min=1), metavar="N", help="Stop after N events.")
@click.option("--compact", is_flag=True, help="One line per event (for scripts).")
@connected()
def monitor_events(
    client: ServiceClient,
    hub: str | None,
    device_id: str | None,
    kinds: tuple[str, ...],
    timeout: int,
    enqueued_time: str | None,
    after: int | None,
    max_events: int | None,
    compact: bool,
) -> None:
    """Print the telemetry devices send to a built-in hub, as it arrives (like
    `az iot hub monitor-events`). Stop with Ctrl-C."""
    host = builtin_hub(client, hub)
    on = f", filtering on device: {device_id}" if device_id else ""
    click.echo(f"Starting event monitor on {host}{on}, use ctrl-c to stop...", err=True)
    count = 0
    events = client.hub_messages.events(
        host, device_id=device_id, after=after, enqueued_time=enqueued_time, quiet_timeout=timeout or None
    )
    try:
        for event in events:
            doc = event_document(event, kinds)
            click.echo(json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=4))
            sys.stdout.flush()
            count += 1
            if max_events is not None and count >= max_events:
                break
    finally:
        events.close()
    click.echo(f"Stopped after {count} event(s).", err=True)


def _properties(pairs: tuple[str, ...]) -> dict[str, str]:
    """``name=value`` items (``a=1;b=2`` holds two, as `az --props` takes them)."""
    out: dict[str, str] = {}
    for pair in pairs:
        for item in pair.split(";"):
            if not item.strip():
                continue
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise click.BadParameter(f"{item!r} is not name=value", param_hint="--property")
            out[name.strip()] = value
    return out


def _body(data: str | None, data_file: Path | None, data_base64: str | None) -> bytes:
    given = [x for x in (data, data_file, data_base64) if x is not None]
    if len(given) > 1:
        raise click.UsageError("Give one of --data, --data-file and --data-base64.")
    if data_file is not None:
        try:
            return data_file.read_bytes()
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {data_file}: {exc.strerror or exc}", param_hint="--data-file"
            ) from None
    if data_base64 is not None:
        try:
            return base64.b64decode(data_base64, validate=True)
        except (binascii.Error, ValueError):
            raise click.BadParameter("not valid base64", param_hint="--data-base64") from None
    return (data or "").encode("utf-8")


@click.command("send-c2d", context_settings=CONTEXT)
@click.argument("device_id")
@click.option("--hub", metavar="HOST", help="The built-in hub [default: the first built-in hub].")
@click.option("--data", metavar="TEXT", help="The message body (UTF-8 text) [default: empty].")
@click.option(
    "--data-file", type=click.Path(dir_okay=False, path_type=Path), help="The message body, from a file."
)
@click.option("--data-base64", metavar="B64", help="The message body, in base64 (binary bodies).")
@click.option(
    "--property",
    "--props",
    "-p",
    "properties",
    multiple=True,
    metavar="NAME=VALUE",
    help="An application property (repeatable; 'a=1;b=2' sets two).",
)
@click.option("--message-id", "--mid", metavar="ID", help="The message id [default: a new UUID].")
@click.option("--correlation-id", "--cid", metavar="ID", help="The correlation id.")
@click.option("--user-id", "--uid", metavar="ID", help="The user id.")
@click.option("--content-type", "--ct", metavar="TYPE", help="The content type, e.g. application/json.")
@click.option("--content-encoding", "--ce", metavar="ENC", help="The content encoding, e.g. utf-8.")
@click.option(
    "--ack",
    type=click.Choice(["none", "positive", "negative", "full"]),
    help="The feedback requested (iothub-ack) [default: none].",
)
@click.option(
    "--expiry",
    metavar="TIME",
    help="When the message expires: ISO 8601, or Unix time in milliseconds (at most 48 hours "
    "ahead) [default: in one hour].",
)
@json_option
@connected()
def send_c2d(
    client: ServiceClient,
    device_id: str,
    hub: str | None,
    data: str | None,
    data_file: Path | None,
    data_base64: str | None,
    properties: tuple[str, ...],
    message_id: str | None,
    correlation_id: str | None,
    user_id: str | None,
    content_type: str | None,
    content_encoding: str | None,
    ack: str | None,
    expiry: str | None,
    as_json: bool,
) -> None:
    """Send a cloud-to-device message to DEVICE_ID of a built-in hub (like
    `az iot device c2d-message send`). It waits in the device's queue (at most 50 messages)
    until the device takes it, or it expires."""
    host = builtin_hub(client, hub)
    queued = client.hub_messages.send_c2d(
        host,
        device_id,
        _body(data, data_file, data_base64),
        message_id=message_id,
        correlation_id=correlation_id,
        user_id=user_id,
        ack=ack,
        expiry=expiry,
        content_type=content_type,
        content_encoding=content_encoding,
        properties=_properties(properties),
    )
    if as_json:
        echo_json(queued)
        return
    print_fields(
        f"Queued a cloud-to-device message for {device_id!r} in {host}:",
        [
            ("Message id", queued.message_id),
            ("Expires", queued.expiry_time_utc),
            ("Acknowledgement", queued.ack),
            ("Messages queued", queued.queue_depth),
        ],
    )


def _method_payload(text: str | None) -> Any:
    """``--method-payload``: JSON, else the text as a JSON string (as `az` takes it)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


@click.command("invoke-method", context_settings=CONTEXT)
@click.argument("device_id")
@click.option("--method-name", "--mn", "-n", required=True, metavar="NAME", help="The method to invoke.")
@click.option(
    "--method-payload",
    "--mp",
    "-p",
    metavar="JSON",
    help="The request payload: JSON (text that is not JSON is sent as a JSON string) [default: null].",
)
@click.option(
    "--timeout",
    "--to",
    type=click.IntRange(MIN_RESPONSE_TIMEOUT, MAX_RESPONSE_TIMEOUT),
    default=DEFAULT_RESPONSE_TIMEOUT,
    show_default=True,
    help="Seconds the device has to answer (responseTimeoutInSeconds).",
)
@click.option(
    "--connect-timeout",
    "--cto",
    type=click.IntRange(0, MAX_CONNECT_TIMEOUT),
    default=0,
    show_default=True,
    help="Seconds to wait for the device to connect and subscribe to methods (0: it must be connected now).",
)
@click.option("--hub", metavar="HOST", help="The built-in hub [default: the first built-in hub].")
@connected()
def invoke_method(
    client: ServiceClient,
    device_id: str,
    method_name: str,
    method_payload: str | None,
    timeout: int,
    connect_timeout: int,
    hub: str | None,
) -> None:
    """Invoke a direct method on DEVICE_ID of a built-in hub and print the device's answer,
    {"status": ..., "payload": ...} (like `az iot hub invoke-device-method`). Fails when the
    device is not connected (404103) or does not answer in time (504101)."""
    host = builtin_hub(client, hub)
    result = client.hub_messages.invoke_method(
        host,
        device_id,
        method_name,
        _method_payload(method_payload),
        response_timeout=timeout,
        connect_timeout=connect_timeout,
    )
    echo_json(result)
