"""The device client over WebSockets against a hostile service on loopback TLS (a raw WebSocket
handshake written by the test): an empty binary message is not the end of the connection, and a
service that never answers the client's close does not hold the client past its timeout."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from provisiond import pki
from provisiond.device import AsyncProvisioningDeviceClient, RetryPolicy, SymmetricKeySecurity
from provisiond.errors import TimeoutError

KEY = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM="
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


@contextlib.asynccontextmanager
async def serving(after_upgrade: bytes, tmp_path: Path) -> AsyncIterator[AsyncProvisioningDeviceClient]:
    """A service that upgrades, sends ``after_upgrade``, then reads everything and says nothing
    (it never answers a close)."""
    files = pki.ensure_dev_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(_handshake(await reader.readuntil(b"\r\n\r\n")) + after_upgrade)
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(session, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    security = SymmetricKeySecurity(registration_id="dev", symmetric_key=KEY)
    client = AsyncProvisioningDeviceClient.create(
        f"localhost:{port}",
        "0ne00000001",
        security,
        "mqtt-ws",
        ca_file=files.ca_file,
        timeout=1.0,
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        yield client
    finally:
        await client.close()
        listener.close()


async def test_a_silent_service_does_not_hold_the_client_past_its_timeout(tmp_path: Path) -> None:
    """No CONNACK, and no answer to the client's close: provisiond's TimeoutError, within the
    5 s guard (the WebSocket library's own close wait, 10 s, came on top of the timeout)."""
    async with serving(b"", tmp_path) as client:
        with pytest.raises(TimeoutError):  # provisiond's: asyncio's (the guard) is not one
            await asyncio.wait_for(client.register(), 5)


async def test_an_empty_message_is_not_the_end_of_the_connection(tmp_path: Path) -> None:
    """WebSocket allows empty messages: after one, the CONNACK that follows is read (then the
    subscription is never answered: a timeout), where the empty one read as a hang-up and the
    client said the service was not an MQTT server."""
    connack = b"\x20\x02\x00\x00"
    async with serving(_frame(b"") + _frame(connack), tmp_path) as client:
        with pytest.raises(TimeoutError, match="did not answer"):
            await asyncio.wait_for(client.register(), 5)
