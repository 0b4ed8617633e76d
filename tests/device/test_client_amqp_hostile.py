"""provisiond's AMQP device client against a hostile AMQP service on loopback TLS (provisiond's
own sans-io machine in the server role, driven by the test): the client's timeout bounds the
whole wait for an answer however many other frames come, and a SASL challenge to PLAIN is a
protocol error, not an AssertionError."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from provisiond import pki
from provisiond.device import AsyncProvisioningDeviceClient, RetryPolicy, SymmetricKeySecurity
from provisiond.errors import RemoteProtocolError, TimeoutError
from provisiond.protocol.amqp.connection import Connection, ConnectionConfig, Side
from provisiond.protocol.amqp.events import ConnectionOpened, Event, LinkAttached, SaslInitReceived
from provisiond.protocol.amqp.performatives import Role, SaslCode

KEY = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM="


class Hostile:
    """An AMQP service that logs the device in and attaches its links, then answers nothing;
    with ``flood``, it grants the device's sender one more credit every 50 ms (frames that are
    not the answer), and with ``challenge`` it answers PLAIN's sasl-init with a challenge."""

    def __init__(self, *, flood: bool = False, challenge: bool = False) -> None:
        self.flood, self.challenge = flood, challenge

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        machine = Connection(
            Side.SERVER,
            ConnectionConfig(container_id="hostile", sasl_mechanisms=("PLAIN",)),
            clock=time.monotonic,
        )
        flooding: asyncio.Task[None] | None = None
        try:
            while data := await reader.read(65536):
                for event in machine.feed_bytes(data):
                    link = self._answer(machine, event)
                    if link is not None and self.flood:
                        flooding = asyncio.create_task(self._grant_forever(machine, writer, link))
                writer.write(machine.get_outbound_data())
        except ConnectionError:
            pass
        finally:
            if flooding is not None:
                flooding.cancel()
            writer.close()

    def _answer(self, machine: Connection, event: Event) -> object | None:
        if isinstance(event, SaslInitReceived):
            if self.challenge:
                machine.sasl_challenge(b"hello")
            else:
                machine.sasl_outcome(SaslCode.OK)
        elif isinstance(event, ConnectionOpened):
            machine.open()
        elif isinstance(event, LinkAttached) and event.answer_needed:
            machine.accept_link(event.link)
            if event.role is Role.RECEIVER:  # ours receives: the device's sender
                return event.link
        return None

    async def _grant_forever(self, machine: Connection, writer: asyncio.StreamWriter, link: object) -> None:
        while True:
            await asyncio.sleep(0.05)
            machine.grant_credit(link, 1)  # type: ignore[arg-type]
            writer.write(machine.get_outbound_data())


@contextlib.asynccontextmanager
async def serving(hostile: Hostile, tmp_path: Path) -> AsyncIterator[AsyncProvisioningDeviceClient]:
    ca = pki.make_root_ca("hostile")
    server = pki.make_server_cert(ca, ["localhost"])
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert_file.write_bytes(pki.certificate_pem(server.cert))
    key_file.write_bytes(pki.private_key_pem(server.key))
    ca_file.write_bytes(pki.certificate_pem(ca.cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    listener = await asyncio.start_server(hostile.session, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    security = SymmetricKeySecurity(registration_id="dev", symmetric_key=KEY)
    client = AsyncProvisioningDeviceClient.create(
        f"localhost:{port}",
        "0ne00000001",
        security,
        "amqp",
        ca_file=ca_file,
        timeout=1.0,
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        yield client
    finally:
        await client.close()
        listener.close()


async def test_frames_that_are_not_the_answer_do_not_restart_the_timeout(tmp_path: Path) -> None:
    """Credit granted every 50 ms, no answer ever: the wait for the answer ends at the client's
    timeout (1 s), where each frame used to start it again and the device waited forever."""
    async with serving(Hostile(flood=True), tmp_path) as client:
        # provisiond's TimeoutError: asyncio's (the 20 s guard, a plain TimeoutError) is not one
        with pytest.raises(TimeoutError, match="did not answer within 1 s"):
            await asyncio.wait_for(client.register(), 20)


async def test_a_sasl_challenge_to_plain_is_a_protocol_error(tmp_path: Path) -> None:
    async with serving(Hostile(challenge=True), tmp_path) as client:
        with pytest.raises(RemoteProtocolError, match="SASL challenge to a PLAIN authentication"):
            await asyncio.wait_for(client.register(), 20)
