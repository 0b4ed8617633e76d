"""The device client over WebSockets against a hostile service on loopback TLS (a raw WebSocket
handshake written by the test): an empty binary message is not the end of the connection, and a
service that never answers the client's close does not hold the client past its timeout."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

import pytest

from provisiond.errors import TimeoutError
from tests.device._hostile import Session, hostile_service

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _frame(payload: bytes) -> bytes:
    """An unmasked binary message (a server's), payload under 126 bytes."""
    return bytes([0x82, len(payload)]) + payload


def _handshake(request: bytes) -> bytes:
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in request.split(b"\r\n")[1:] if line)
    )
    accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + accept
        + b"\r\nSec-WebSocket-Protocol: "
        + headers[b"sec-websocket-protocol"]
        + b"\r\n\r\n"
    )


def _service(after_upgrade: bytes) -> Session:
    """A service that upgrades, sends ``after_upgrade``, then reads everything and says nothing
    (it never answers a close)."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(_handshake(await reader.readuntil(b"\r\n\r\n")) + after_upgrade)
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return session


async def test_a_silent_service_does_not_hold_the_client_past_its_timeout(tmp_path: Path) -> None:
    """No CONNACK, and no answer to the client's close: provisiond's TimeoutError, within the
    5 s guard (the WebSocket library's own close wait, 10 s, came on top of the timeout)."""
    async with hostile_service(_service(b""), "mqtt-ws", tmp_path) as client:
        with pytest.raises(TimeoutError):  # provisiond's: asyncio's (the guard) is not one
            await asyncio.wait_for(client.register(), 5)


async def test_an_empty_message_is_not_the_end_of_the_connection(tmp_path: Path) -> None:
    """WebSocket allows empty messages: after one, the CONNACK that follows is read (then the
    subscription is never answered: a timeout), where the empty one read as a hang-up and the
    client said the service was not an MQTT server."""
    connack = b"\x20\x02\x00\x00"
    async with hostile_service(_service(_frame(b"") + _frame(connack)), "mqtt-ws", tmp_path) as client:
        with pytest.raises(TimeoutError, match="did not answer"):
            await asyncio.wait_for(client.register(), 5)
