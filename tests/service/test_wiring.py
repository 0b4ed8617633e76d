"""The app factory wires the device transports explicitly: each app built by ``create_app`` has
its own gateway, MQTT/AMQP TLS listeners and WebSocket router (no module-level registry filled at
import), so two apps in one process (tests, an embedding application) do not share them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from provisiond.protocol.mqtt import Connack, Connect, ConnectReturnCode, decode_packet, encode_packet
from provisiond.service.app import create_app
from provisiond.service.gateway import DeviceGateway
from provisiond.service.settings import Settings
from tests._server import free_port


def _settings(data_dir: Path, **extra: object) -> Settings:
    data_dir.mkdir(parents=True)
    return Settings(data_dir=data_dir, mqtt_port=0, amqp_port=0, **extra)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """``app`` served by uvicorn on loopback (plain TCP) in this event loop; its ws:// URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
        assert not task.done(), task
    try:
        yield f"ws://127.0.0.1:{port}/$iothub/websocket"
    finally:
        server.should_exit = True
        await task


async def test_two_apps_in_one_process_keep_their_own_websocket_endpoints(tmp_path: Path) -> None:
    """The MQTT endpoint over WebSockets refuses a packet over the body limit of *its* app: a
    12 KB CONNECT closes the connection of an app whose limit is 1,000 bytes (+ 8 KiB for the
    packet) and gets a CONNACK from an app with the default limit, while both run."""
    small = create_app(_settings(tmp_path / "small", max_body_bytes=1000))
    large = create_app(_settings(tmp_path / "large"))
    connect = encode_packet(
        Connect(client_id="dev-1", username="0ne00000001/registrations/dev-1", password=b"x" * 12_000)
    )
    async with serving(small) as small_url, serving(large) as large_url:
        async with ws_connect(large_url, subprotocols=[Subprotocol("mqtt")]) as ws:
            await ws.send(connect)
            _, packet = decode_packet(memoryview(await ws.recv(decode=False)))
            assert packet == Connack(return_code=ConnectReturnCode.BAD_USERNAME_OR_PASSWORD)
        async with ws_connect(small_url, subprotocols=[Subprotocol("MQTT")]) as ws:
            assert ws.subprotocol == "MQTT"  # echoed as the client spelled it
            await ws.send(connect)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    assert isinstance(small.state.gateway, DeviceGateway) and small.state.gateway is not large.state.gateway
    assert small.state.gateway.ctx.settings.max_body_bytes == 1000
