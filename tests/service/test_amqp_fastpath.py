"""The AMQP endpoint's fast path for the SDKs' script (:mod:`provisiond.protocol.amqp.fastpath`)
against the general machines alone: the same device bytes, cut into reads every which way, with
deviations at every frame and mutated sessions, must get the same bytes back and the same log
lines, whether a connection starts on the fast path (and is handed over) or not. The endpoint
runs in process on a stub registrar with deterministic message ids; over real sockets, the whole
AMQP suite and the interop tests run on the fast path (it is the default)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bench._transports import amqp_steps

import provisiond.service.amqp as endpoint_module
import provisiond.service.gateway as gateway_module
from provisiond.protocol.amqp import dps
from provisiond.protocol.amqp.frames import Frame, FrameType, encode_frame, frame_at
from provisiond.protocol.amqp.message import encode_message
from provisiond.protocol.amqp.performatives import Begin, Flow, Role, SaslCode, SaslInit, SaslOutcome
from provisiond.protocol.amqp.shapes import (
    Reply,
    attach_and_termini,
    attach_like,
    open_like,
    sasl_init_like,
    transfer_like,
    write_attach,
)
from provisiond.protocol.amqp.types import Symbol
from provisiond.protocol.amqp.values import ULong
from provisiond.service.amqp import HANDED_OVER, AmqpEndpoint
from provisiond.service.context import ServiceContext
from provisiond.service.gateway import AMQP, DeviceGateway
from provisiond.service.settings import Settings
from tests.service.test_amqp_endpoint import REG, SCOPE, _client_wire, _FakeStream, _StubRegistrar

_NOW = datetime.datetime(2026, 12, 5, tzinfo=datetime.UTC)


class _Ids:
    """``uuid.uuid4`` for the endpoint: the same ids in the same order on both paths."""

    def __init__(self) -> None:
        self.count = 0

    def uuid4(self) -> uuid.UUID:
        self.count += 1
        return uuid.UUID(int=self.count)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("provisiond.amqp")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class _Run:
    def __init__(self, tmp_path: Path, lines: _Lines, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lines = lines
        self.monkeypatch = monkeypatch
        #: The service's clock (the SAS tokens' expiry): the seed sessions' fixed time, or when
        #: a recording was made.
        self.now: float = _CLOCK
        clock = lambda: self.now  # noqa: E731
        ctx = ServiceContext(settings=Settings(data_dir=tmp_path), store=None, clock=clock)  # type: ignore[arg-type]
        gateway = DeviceGateway(ctx, _StubRegistrar())  # type: ignore[arg-type]
        self.endpoints = {fast: AmqpEndpoint(gateway, AMQP, fast_path=fast) for fast in (True, False)}
        self.endpoints[False].config = self.endpoints[True].config  # one container id
        self.handed_over = 0

    async def one(
        self, fast: bool, chunks: list[bytes], chain: list[bytes] | None
    ) -> tuple[bytes, list[str]]:
        ids = _Ids()  # message ids, and the tracking ids and time of DPS's error bodies
        self.monkeypatch.setattr(endpoint_module, "uuid", ids)
        self.monkeypatch.setattr(gateway_module, "uuid", ids)
        self.monkeypatch.setattr(gateway_module, "utc_now", lambda: _NOW)
        self.lines.lines.clear()
        stream = _FakeStream(chunks, client_chain=chain)
        await self.endpoints[fast](stream)  # type: ignore[arg-type]
        logged = [line for line in self.lines.lines if not line.endswith(HANDED_OVER)]
        self.handed_over += len(logged) != len(self.lines.lines)
        return bytes(stream.sent), logged

    async def same(self, chunks: list[bytes], chain: list[bytes] | None = None) -> bool:
        """Both paths answer ``chunks`` alike; True when the fast path handed over."""
        general = await self.one(False, chunks, chain)
        before = self.handed_over
        fast = await self.one(True, chunks, chain)
        assert fast[0] == general[0], chunks
        assert fast[1] == general[1], chunks
        return self.handed_over > before


@pytest.fixture
def run(tmp_path: Path, lines: _Lines, monkeypatch: pytest.MonkeyPatch) -> _Run:
    return _Run(tmp_path, lines, monkeypatch)


def _units(wire: bytes) -> list[bytes]:
    """A device's bytes as protocol headers and frames."""
    units, at = [], 0
    while at < len(wire):
        size = 8 if wire[at : at + 4] == b"AMQP" else int.from_bytes(wire[at : at + 4], "big")
        units.append(wire[at : at + size])
        at += size
    return units


def _frame(performative: Any, *, sasl: bool = False, channel: int = 0) -> bytes:
    buffer = bytearray()
    encode_frame(Frame(FrameType.SASL if sasl else FrameType.AMQP, channel, performative), buffer)
    return bytes(buffer)


#: The service's clock in these tests, and the expiry of the seed sessions' SAS tokens: fixed,
#: so that the sessions (and so the mutations of :func:`test_mutated_sessions_are_answered_alike`)
#: are the same bytes in every run.
_CLOCK = 1_800_000_000.0
_EXPIRY = int(_CLOCK) + 3600


def _sdk_turns(scope: str = SCOPE) -> list[bytes]:
    """The SDK-like script of the load generator, in the turns a device sends it (a fixed
    expiry, and fixed ids for the container, the links and the message)."""
    return amqp_steps(scope, REG, "AAAA", expiry=_EXPIRY, ids=_Ids().uuid4)


def _wires() -> dict[str | None, bytes]:
    """Devices of the project's own AMQP layer (both requests on one link), by SASL mechanism."""
    return {name: _client_wire(name, _EXPIRY) for name in ("PLAIN", "ANONYMOUS", "EXTERNAL", None)}


_SDK_TURNS = _sdk_turns()
_WIRES = _wires()
_CHAIN = [b"a certificate"]

#: Frames that the fast path does not serve, each inserted after every frame of a script.
_DEVIATIONS = {
    "heartbeat": b"\x00\x00\x00\x08\x02\x00\x00\x00",
    "drain": _frame(
        Flow(incoming_window=9, next_outgoing_id=0, outgoing_window=9, handle=1, link_credit=3, drain=True)
    ),
    "second begin": _frame(Begin(next_outgoing_id=0, incoming_window=9, outgoing_window=9), channel=1),
    "sasl frame": _frame(SaslOutcome(code=SaslCode.OK), sasl=True),
    "garbage": b"\x00\x00\x00\x0c\x02\x00\x00\x00\x00\x53\x7f\x45",
}


async def test_the_sdk_script_is_answered_on_the_fast_path_as_by_the_machine(run: _Run) -> None:
    # In the turns the SDKs send it, each frame alone, all at once.
    wire = b"".join(_SDK_TURNS)
    assert not await run.same(_SDK_TURNS)
    assert not await run.same(_units(wire))
    await run.same([wire])
    for name, device in _WIRES.items():
        chain = _CHAIN if name == "EXTERNAL" else None
        assert not await run.same(_units(device), chain), name
        await run.same([device], chain)


async def test_every_cut_of_the_script_reads_the_same(run: _Run) -> None:
    wire = b"".join(_SDK_TURNS)
    for cut in range(1, len(wire)):
        await run.same([wire[:cut], wire[cut:]])
    units = _units(wire)
    for cut in range(1, len(units)):
        await run.same([b"".join(units[:cut]), b"".join(units[cut:])])


@pytest.mark.parametrize("deviation", list(_DEVIATIONS))
async def test_a_deviation_after_any_frame_is_handed_over_unseen(run: _Run, deviation: str) -> None:
    units = _units(b"".join(_SDK_TURNS))
    handed = 0
    for at in range(1, len(units) + 1):
        # Each frame its own read, and the deviation with the frame before it in one read.
        chunks = [*units[:at], _DEVIATIONS[deviation], *units[at:]]
        handed += await run.same(chunks)
        merged = [*units[: at - 1], units[at - 1] + _DEVIATIONS[deviation], *units[at:]]
        handed += await run.same(merged)
    assert handed >= len(units)  # the replay was exercised, not only the fast path


async def test_refusals_and_unusual_sessions_are_the_machines(run: _Run) -> None:
    turns = list(_SDK_TURNS)
    other = _sdk_turns("0ne00OTHER0")
    assert await run.same([turns[0], other[1], *turns[2:]])  # the links name another scope
    bad_token = dps.plain_response(f"{SCOPE}/registrations/{REG}", "SharedAccessSignature sr=x")
    init = _frame(SaslInit(mechanism=Symbol("PLAIN"), initial_response=bad_token), sasl=True)
    assert await run.same([turns[0], init, *turns[2:]])
    assert await run.same(_units(_WIRES["EXTERNAL"]))  # EXTERNAL without a client certificate
    tpm = turns[1].replace(b"PLAIN", b"TPM\x00\x00")
    assert await run.same([turns[0], tpm, *turns[2:]])
    # The answer's credit used up: the device gives no credit on its receiving link.
    no_credit = turns[2].replace(b"\x43\x52\x08", b"\x43\x52\x00")
    assert no_credit != turns[2]
    assert await run.same([turns[0], turns[1], no_credit, *turns[3:]])


#: What the Node.js SDK sent, read by read (see the file's "about").
_NODE_SDK = json.loads((Path(__file__).parent / "amqp_node_sdk.json").read_text())["sessions"]


@pytest.mark.parametrize("session", sorted(_NODE_SDK))
async def test_the_node_sdk_recorded_is_answered_on_the_fast_path_as_by_the_machine(
    run: _Run, session: str
) -> None:
    recorded = _NODE_SDK[session]
    run.now = recorded["time"] + 1
    reads = [bytes.fromhex(read) for read in recorded["reads"]]
    assert not await run.same(reads)  # the whole session on the fast path
    sent, logged = await run.one(True, reads, None)
    assert b'"status":"assigned"' in sent or session == "bad"
    assert await run.same(reads[:3] + [_DEVIATIONS["heartbeat"]] + reads[3:])  # and handed over
    for at in range(1, len(reads)):  # two reads in one
        await run.same([*reads[: at - 1], reads[at - 1] + reads[at], *reads[at + 1 :]])


#: Mutated sessions compared on both paths, per fuzz seed.
FUZZ_SESSIONS = 4000
#: The fuzz seeds of a wide run by hand: ``PROVISIOND_AMQP_FUZZ=FIRST-LAST`` (inclusive).
FUZZ_VARIABLE = "PROVISIOND_AMQP_FUZZ"


def _fuzz_seeds() -> range:
    wide = os.environ.get(FUZZ_VARIABLE)
    if not wide:
        return range(13, 14)
    first, _, last = wide.partition("-")
    return range(int(first), int(last or first) + 1)


def _seed_sessions() -> list[tuple[bytes, float]]:
    """The sessions the fuzz mutates, each with the service's clock it is read at: the load
    generator's script, the project's own client (PLAIN, ANONYMOUS, no SASL) and the Node SDK's
    recordings."""
    seeds = [(b"".join(_sdk_turns()), _CLOCK)]
    seeds += [(wire, _CLOCK) for name, wire in _wires().items() if name != "EXTERNAL"]
    for _, recorded in sorted(_NODE_SDK.items()):
        seeds.append((b"".join(bytes.fromhex(read) for read in recorded["reads"]), recorded["time"] + 1))
    return seeds


def test_the_fuzz_reads_the_same_sessions_in_every_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed sessions do not depend on the wall clock or on random ids."""
    first = _seed_sessions()
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    assert _seed_sessions() == first


async def test_mutated_sessions_are_answered_alike(run: _Run) -> None:
    """Mutated sessions (bits flipped, bytes cut out and put in), cut into random reads, are
    answered alike on both paths. The seed sessions and the mutations are the same in every run
    (seed 13, :data:`FUZZ_SESSIONS` sessions). A wider fuzz by hand, over a range of seeds::

        PROVISIOND_AMQP_FUZZ=0-99 pytest tests/service/test_amqp_fastpath.py -k mutated

    A mismatch names the seed and the session's number."""
    seeds = _seed_sessions()
    for seed in _fuzz_seeds():
        rng = random.Random(seed)
        for number in range(FUZZ_SESSIONS):
            wire, run.now = rng.choice(seeds)
            data = bytearray(wire)
            for _ in range(rng.randint(1, 3)):
                where = rng.randrange(len(data))
                op = rng.randrange(3)
                if op == 0:
                    data[where] ^= 1 << rng.randrange(8)
                elif op == 1:
                    del data[where : where + rng.randint(1, 8)]
                else:
                    data[where:where] = rng.randbytes(rng.randint(1, 8))
            cuts = sorted(rng.sample(range(1, len(data)), k=min(5, len(data) - 1)))
            chunks = [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            try:
                await run.same(chunks)
            except Exception as exc:
                raise AssertionError(f"seed {seed}, session {number}") from exc


@pytest.mark.parametrize(
    "correlation_id",
    [None, "c0", uuid.UUID(int=7), ULong(9), b"\x01\x02", "x" * 300],
    ids=["none", "string", "uuid", "ulong", "binary", "long"],
)
@pytest.mark.parametrize("size", [0, 255, 256, 70_000])
def test_an_answer_written_from_its_parts_is_the_message_encoded(correlation_id: Any, size: int) -> None:
    for properties in (None, {"retry-after": "3", "Retry-After": "3"}):
        reply = Reply(str(uuid.UUID(int=5)), correlation_id, properties, b"b" * size)
        assert reply.payload() == encode_message(reply.message())


def test_an_attach_read_by_its_shape_is_the_attach_decoded() -> None:
    """The SDKs' attaches read from the shape of one read before (the name and the device's
    address put back) equal the general decoder's; what has no such shape is left to it."""
    sessions = {name: [bytes.fromhex(read) for read in s["reads"]] for name, s in _NODE_SDK.items()}
    sessions["generator"] = list(_SDK_TURNS)
    read = 0
    for name, reads in sessions.items():
        units = _units(b"".join(reads))
        init = next((u for u in units if u[8:11] == b"\x00\x53\x41"), None)
        if init is None:
            continue  # X.509: no address from SASL, the attaches are read the general way
        found = frame_at(init, 1 << 20)
        assert found is not None and isinstance(found[0].performative, SaslInit)
        address = (found[0].performative.initial_response or b"").split(b"\x00")[1]
        for unit in (u for u in units if u[8:11] == b"\x00\x53\x12"):
            decoded = frame_at(unit, 1 << 20)
            assert decoded is not None
            for _ in range(2):  # the shape made, then found
                assert attach_like(unit, address) == decoded[0].performative, name
                read += 1
            # Its termini echoed from the shape's encoding, as encoded from the attach.
            found = attach_and_termini(unit, address)
            assert found is not None and found[1] is not None, name
            link = SimpleNamespace(name=found[0].name, handle=3, role=Role.RECEIVER, remote=found[0])
            echoed, encoded = bytearray(), bytearray()
            write_attach(echoed, link, None, 1 << 20, found[1])
            write_attach(encoded, link, None, 1 << 20)
            assert echoed == encoded, name
            assert attach_like(unit, address.upper()) is None  # the address is not in it
            # A name that is not UTF-8 is not read by its shape (the decoder refuses it).
            bad = unit.replace(b"\xa1" + bytes((unit[unit.index(b"\xa1") + 1],)), b"\xa1\x01\xff", 1)
            assert attach_like(bad, address) is None or attach_like(bad, address) == frame_at(bad, 1 << 20)
    assert read >= 12


def test_an_open_read_by_its_shape_is_the_open_decoded() -> None:
    sessions = [[bytes.fromhex(read) for read in s["reads"]] for s in _NODE_SDK.values()]
    read = 0
    for reads in [*sessions, list(_SDK_TURNS), [_WIRES[None]]]:
        for unit in (u for u in _units(b"".join(reads)) if u[8:11] == b"\x00\x53\x10"):
            decoded = frame_at(unit, 1 << 20)
            assert decoded is not None
            for _ in range(2):  # the shape made, then found
                assert open_like(unit) == decoded[0].performative
                read += 1
            at = unit.index(b"\xa1")  # the container-id: not UTF-8, not read by its shape
            assert open_like(unit[: at + 2] + b"\xff" + unit[at + 3 :]) is None
    assert read >= 12


def _every_unit() -> list[bytes]:
    """Every frame of the Node SDK's recordings, the load generator's script and the project's
    own client's sessions."""
    sessions = [[bytes.fromhex(read) for read in s["reads"]] for s in _NODE_SDK.values()]
    sessions += [list(_SDK_TURNS), *([wire] for wire in _WIRES.values())]
    return [unit for reads in sessions for unit in _units(b"".join(reads))]


def test_a_sasl_init_read_by_its_shape_is_the_sasl_init_decoded() -> None:
    read = 0
    for unit in (u for u in _every_unit() if u[4:11] == b"\x02\x01\x00\x00\x00\x53\x41"):
        decoded = frame_at(unit, 1 << 20)
        assert decoded is not None
        for _ in range(2):  # the shape made, then found (a response is what it is read around)
            found = sasl_init_like(unit)
            assert found == decoded[0].performative or (found is None and b"PLAIN" not in unit)
            read += found is not None
        # A response claiming more bytes than the frame holds: left to the decoder.
        at = unit.index(b"PLAIN") + 5 if b"PLAIN" in unit else 0
        if at and unit[at] == 0xA0:
            assert sasl_init_like(unit[: at + 1] + b"\xff" + unit[at + 2 :]) is None
    # Responses of every size around vbin8's limit (vbin32 above it), and none.
    for size in (0, 1, 254, 255, 256, 300):
        for response in (bytes(range(256)) * 2)[:size], None:
            made = _frame(
                SaslInit(mechanism=Symbol("PLAIN"), initial_response=response, hostname="h"), sasl=True
            )
            decoded = frame_at(made, 1 << 20)
            assert decoded is not None
            for _ in range(2):
                found = sasl_init_like(made)
                assert found is None or found == decoded[0].performative
                read += found is not None
    assert read >= 8


def test_a_transfer_read_by_its_performative_is_the_transfer_decoded() -> None:
    read = 0
    for unit in (u for u in _every_unit() if u[4:11] == b"\x02\x00\x00\x00\x00\x53\x14"):
        decoded = frame_at(unit, 1 << 20)
        assert decoded is not None
        for _ in range(2):
            assert transfer_like(unit) == (decoded[0].performative, decoded[0].payload)
            read += 1
        # Its performative cut short (the list claims more than the frame holds): not read so.
        assert transfer_like(unit[:13] + bytes((len(unit),)) + unit[14:]) is None
    # A delivery state holding a map is not shared.
    state = bytes.fromhex("0053145006")  # not a transfer at all: no shape
    assert transfer_like(b"\x00\x00\x00\x0d\x02\x00\x00\x00" + state) is None
    assert read >= 16


async def test_an_attach_whose_address_is_a_symbol_is_answered_alike(run: _Run) -> None:
    """An attach whose terminus address is encoded as a symbol rather than a string (the
    mutated-session fuzz found one): the machine echoes a symbol, so the fast path must not
    read it by the shape of a string address."""
    data = bytearray(b"".join(_SDK_TURNS))
    at = data.index(b"\x00S)\xc0") + 6  # the source's list8: its address, the first field
    assert data[at] == 0xA1  # str8
    data[at] = 0xA3  # sym8
    for split in ([bytes(data)], [bytes(data[:at]), bytes(data[at:])]):
        await run.same(split)


async def test_a_frame_shorter_than_its_header_is_answered_alike(run: _Run) -> None:
    """A frame whose size says fewer bytes than a frame header, its descriptor an open's or an
    attach's (the wide fuzz found it): a framing error on both paths, not an IndexError in the
    shape readers."""
    turns = _sdk_turns()
    setup = turns[2]
    at = setup.index(b"\x00\x53\x10") - 8  # the open's frame, after the AMQP header
    short_open = setup[:at] + b"\x00\x00\x00\x05" + setup[at + 4 :]
    at = setup.index(b"\x00\x53\x12") - 8  # the first attach's frame
    short_attach = setup[:at] + b"\x00\x00\x00\x0b" + setup[at + 4 :]
    for broken in (short_open, short_attach):
        assert await run.same([*turns[:2], broken, *turns[3:]])
        assert await run.same([b"".join([*turns[:2], broken, *turns[3:]])])
