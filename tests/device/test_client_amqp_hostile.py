"""provisiond's AMQP device client against a hostile AMQP service on loopback TLS (provisiond's
own sans-io machine in the server role, driven by the test): the client's timeout bounds the
whole wait for an answer however many other frames come, and a SASL challenge to PLAIN is a
protocol error, not an AssertionError."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from provisiond.errors import RemoteProtocolError, TimeoutError
from provisiond.protocol.amqp.connection import Connection, ConnectionConfig, Side
from provisiond.protocol.amqp.events import ConnectionOpened, Event, LinkAttached, SaslInitReceived
from provisiond.protocol.amqp.performatives import Role, SaslCode
from tests.device._hostile import hostile_service


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


async def test_frames_that_are_not_the_answer_do_not_restart_the_timeout(tmp_path: Path) -> None:
    """Credit granted every 50 ms, no answer ever: the wait for the answer ends at the client's
    timeout (1 s), where each frame used to start it again and the device waited forever."""
    async with hostile_service(Hostile(flood=True).session, "amqp", tmp_path) as client:
        # provisiond's TimeoutError: asyncio's (the 20 s guard, a plain TimeoutError) is not one
        with pytest.raises(TimeoutError, match="did not answer within 1 s"):
            await asyncio.wait_for(client.register(), 20)


async def test_a_sasl_challenge_to_plain_is_a_protocol_error(tmp_path: Path) -> None:
    async with hostile_service(Hostile(challenge=True).session, "amqp", tmp_path) as client:
        with pytest.raises(RemoteProtocolError, match="SASL challenge to a PLAIN authentication"):
            await asyncio.wait_for(client.register(), 20)
