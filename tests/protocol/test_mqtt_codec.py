"""The MQTT 3.1.1 codec and connection machine, without I/O: round trips, every truncation,
malformed input, client/server pairs, Hypothesis properties, and a bounded fuzz of the decoder
and of a server connection (random bytes and mutated valid sessions).

The invariant, from h11's fuzzer: every input either parses, or raises RemoteProtocolError
(InsufficientData from the bare decoder), never anything else.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisiond.errors import InsufficientData, LocalProtocolError, RemoteProtocolError
from provisiond.protocol.mqtt import (
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    Lapse,
    MqttConnection,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    QoS,
    Role,
    State,
    Suback,
    SubackReturnCode,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    decode_packet,
    encode_packet,
)

SAMPLES: list[Packet] = [
    Connect(client_id="dev-1"),
    Connect(
        client_id="dev-1",
        username="0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=x%2F1",
        password=b"SharedAccessSignature sr=a&sig=b&se=1",
        clean_session=False,
        keep_alive=0,
    ),
    Connect(
        client_id="",
        username="u",
        will=Will(topic="last/will", message=b"\x00\xff", qos=QoS.AT_LEAST_ONCE, retain=True),
        keep_alive=65535,
    ),
    Connect(client_id="ü-ñ-✓", username="u", password=b""),
    Connack(),
    Connack(session_present=True),
    *[Connack(return_code=code) for code in ConnectReturnCode if code is not ConnectReturnCode.ACCEPTED],
    Publish(topic="$dps/registrations/PUT/iotdps-register/?$rid=1", payload=b'{"registrationId":"d"}'),
    Publish(topic="t", qos=QoS.AT_LEAST_ONCE, packet_id=1, retain=True, dup=True),
    Publish(topic="a/ü", payload=b"x" * 300, qos=QoS.AT_LEAST_ONCE, packet_id=65535),
    Publish(topic="$dps/registrations/res/202/?$rid=1&retry-after=3", payload=b""),
    Puback(packet_id=7),
    Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="$dps/registrations/res/#"),)),
    Subscribe(
        packet_id=300,
        subscriptions=(
            Subscription(topic_filter="a/+/b", qos=QoS.AT_MOST_ONCE),
            Subscription(topic_filter="#", qos=QoS.EXACTLY_ONCE),
        ),
    ),
    Suback(packet_id=1, return_codes=(SubackReturnCode.GRANTED_QOS_1,)),
    Suback(packet_id=2, return_codes=tuple(SubackReturnCode)),
    Unsubscribe(packet_id=9, topic_filters=("$dps/registrations/res/#", "x")),
    Unsuback(packet_id=9),
    Pingreq(),
    Pingresp(),
    Disconnect(),
]


def ids(packet: Packet) -> str:
    return f"{packet.packet_type.name}-{SAMPLES.index(packet)}"


def decode_all(data: bytes) -> tuple[bytes, Packet]:
    rest, packet = decode_packet(memoryview(data))
    return bytes(rest), packet


# --- round trips and truncations -------------------------------------------------------------------


@pytest.mark.parametrize("packet", SAMPLES, ids=ids)
def test_round_trip(packet: Packet) -> None:
    data = encode_packet(packet)
    assert decode_all(data) == (b"", packet)
    assert decode_all(data + b"\xc0\x00") == (b"\xc0\x00", packet)  # the next packet is left alone


@pytest.mark.parametrize("packet", SAMPLES, ids=ids)
def test_every_truncation_needs_more_data(packet: Packet) -> None:
    data = encode_packet(packet)
    for length in range(len(data)):
        with pytest.raises(InsufficientData):
            decode_packet(memoryview(data)[:length])


def test_known_encodings() -> None:
    """Byte vectors written from the specification, not from our encoder."""
    assert encode_packet(Pingreq()) == b"\xc0\x00"
    assert encode_packet(Pingresp()) == b"\xd0\x00"
    assert encode_packet(Disconnect()) == b"\xe0\x00"
    assert encode_packet(Connack()) == b"\x20\x02\x00\x00"
    assert encode_packet(Puback(packet_id=0x1234)) == b"\x40\x02\x12\x34"
    assert encode_packet(Connect(client_id="a", keep_alive=60)) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a"
    )
    assert encode_packet(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="a/#"),))) == (
        b"\x82\x08\x00\x01\x00\x03a/#\x01"
    )
    # A 200-byte body needs a two-byte remaining length: 200 = 0x48 | 0x80, 0x01.
    publish = encode_packet(Publish(topic="t", payload=b"p" * 197))
    assert publish[:3] == b"\x30\xc8\x01"


# --- malformed input -------------------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"\x00\x00", "reserved", id="type-0"),
    pytest.param(b"\xf0\x00", "reserved", id="type-15"),
    pytest.param(b"\x50\x02\x00\x01", "not supported", id="pubrec"),
    pytest.param(b"\x62\x02\x00\x01", "not supported", id="pubrel"),
    pytest.param(b"\xc1\x00", "reserved flags", id="pingreq-flags"),
    pytest.param(b"\x80\x06\x00\x01\x00\x01a\x01", "reserved flags", id="subscribe-flags-0"),
    pytest.param(b"\xc0\x80\x80\x80\x80\x01", "more than 4 bytes", id="varint-5-bytes"),
    pytest.param(b"\xc0\x80\x00", "shortest", id="varint-not-minimal"),
    pytest.param(b"\xc0\x01\x00", "has a 1-byte body", id="pingreq-body"),
    pytest.param(b"\x20\x02\x02\x00", "reserved connack", id="connack-flags"),
    pytest.param(b"\x20\x02\x00\x06", "not a connack return code", id="connack-code"),
    pytest.param(b"\x20\x02\x01\x05", "session present", id="connack-refused-with-session"),
    pytest.param(b"\x20\x03\x00\x00\x00", "after its last field", id="connack-trailing"),
    pytest.param(b"\x36\x03\x00\x01t", "qos 3", id="publish-qos3"),
    pytest.param(b"\x38\x03\x00\x01t", "dup", id="publish-qos0-dup"),
    pytest.param(b"\x32\x05\x00\x01t\x00\x00", "packet identifier", id="publish-id-0"),
    pytest.param(b"\x30\x02\x00\x00", "empty", id="publish-empty-topic"),
    pytest.param(b"\x30\x04\x00\x02a+", "wildcard", id="publish-wildcard"),
    pytest.param(b"\x30\x04\x00\x02\xc3\x28", "utf-8", id="publish-bad-utf8"),
    pytest.param(b"\x30\x04\x00\x02a\x00", "u+0000", id="publish-nul"),
    pytest.param(b"\x30\x05\x00\x05abc", "ends inside a field", id="publish-short-topic"),
    pytest.param(b"\x40\x02\x00\x00", "packet identifier", id="puback-id-0"),
    pytest.param(b"\x40\x03\x00\x01\x00", "after its last field", id="puback-trailing"),
    pytest.param(b"\x82\x02\x00\x01", "at least one", id="subscribe-empty"),
    pytest.param(b"\x82\x06\x00\x01\x00\x01a\x03", "qos byte", id="subscribe-qos3"),
    pytest.param(b"\x82\x07\x00\x01\x00\x02a#\x01", "whole, last level", id="subscribe-bad-hash"),
    pytest.param(b"\x82\x07\x00\x01\x00\x02a+\x01", "whole level", id="subscribe-bad-plus"),
    pytest.param(b"\x90\x03\x00\x01\x03", "suback return code", id="suback-code"),
    pytest.param(b"\xa2\x02\x00\x01", "at least one", id="unsubscribe-empty"),
    pytest.param(b"\x10\x06\x00\x04HTTP", "protocol name", id="connect-not-mqtt"),
    pytest.param(
        b"\x10\x0d\x00\x04MQTT\x04\x03\x00\x3c\x00\x01a", "reserved connect flag", id="connect-reserved"
    ),
    pytest.param(b"\x10\x0d\x00\x04MQTT\x04\x0a\x00\x3c\x00\x01a", "without a will", id="connect-will-qos"),
    pytest.param(
        b"\x10\x0d\x00\x04MQTT\x04\x42\x00\x3c\x00\x01a", "password without", id="connect-password-only"
    ),
    pytest.param(b"\x10\x0d\x00\x04MQTT\x04\x1e\x00\x3c\x00\x01a", "will qos 3", id="connect-will-qos3"),
    pytest.param(
        b"\x10\x0d\x00\x04MQTT\x04\x82\x00\x3c\x00\x01a", "ends inside", id="connect-missing-username"
    ),
    pytest.param(
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x01ab", "after its last field", id="connect-trailing"
    ),
]


@pytest.mark.parametrize(("data", "words"), MALFORMED)
def test_malformed_input_is_a_remote_protocol_error(data: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data)
    assert words.lower() in str(info.value).lower()


def test_a_packet_over_the_maximum_is_refused_from_its_header() -> None:
    header = b"\x30\xff\xff\x03"  # a PUBLISH announcing 65,535 bytes; nothing else has arrived
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum packet size of 1000 bytes"):
        decode_packet(memoryview(header), max_packet_size=1000)
    exactly = encode_packet(Publish(topic="t", payload=b"x" * 990))
    assert len(exactly) == 996  # 1 + 2 (remaining length) + 2 + 1 (topic) + 990
    decode_packet(memoryview(exactly), max_packet_size=996)
    with pytest.raises(RemoteProtocolError):
        decode_packet(memoryview(exactly), max_packet_size=995)


def test_other_protocol_levels_decode_far_enough_to_be_refused() -> None:
    mqtt5 = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc"  # properties, then the client id
    packet = decode_all(mqtt5)[1]
    assert isinstance(packet, Connect) and packet.protocol_level == 5 and not packet.is_supported_version
    mqtt31 = b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01a"
    packet = decode_all(mqtt31)[1]
    assert isinstance(packet, Connect) and (packet.protocol_name, packet.protocol_level) == ("MQIsdp", 3)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: Publish(topic="a/#"), id="publish-wildcard"),
        pytest.param(lambda: Publish(topic="t", qos=QoS.AT_LEAST_ONCE), id="publish-no-id"),
        pytest.param(lambda: Publish(topic="t", packet_id=1), id="publish-qos0-id"),
        pytest.param(lambda: Connect(client_id="a", password=b"p"), id="password-without-username"),
        pytest.param(lambda: Connect(client_id="a", keep_alive=70000), id="keep-alive"),
        pytest.param(
            lambda: Connack(return_code=ConnectReturnCode.NOT_AUTHORIZED, session_present=True), id="connack"
        ),
        pytest.param(lambda: Subscribe(packet_id=1, subscriptions=()), id="subscribe-empty"),
        pytest.param(lambda: Puback(packet_id=0), id="puback-0"),
        pytest.param(lambda: Connect(client_id="a\x00"), id="nul"),
        pytest.param(lambda: Publish(topic="𝄞" * 16384), id="topic-too-long"),
    ],
)
def test_invalid_packets_cannot_be_built(build: Callable[[], Packet]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


# --- the connection machine ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(clock: Clock, **server_options: float) -> tuple[MqttConnection, MqttConnection]:
    return (
        MqttConnection(Role.CLIENT, clock=clock),
        MqttConnection(Role.SERVER, clock=clock, **server_options),  # type: ignore[arg-type]
    )


def pump(source: MqttConnection, target: MqttConnection) -> list[Packet]:
    return target.feed_bytes(source.get_outbound_data())


def test_a_client_and_a_server_talk() -> None:
    clock = Clock()
    client, server = pair(clock)
    client.connect(client_id="dev", username="u", password=b"p", keep_alive=30)
    sub_id = client.subscribe([Subscription(topic_filter="$dps/registrations/res/#")])
    pub_id = client.publish("req/1", b"{}")
    # The server pauses after the CONNECT: nothing pipelined behind it is answered before the CONNACK.
    (connect,) = pump(client, server)
    assert isinstance(connect, Connect) and server.state is State.CONNECTING
    assert server.get_outbound_data() == b""
    server.accept()
    subscribe, publish = server.feed_bytes(b"")
    assert isinstance(subscribe, Subscribe) and isinstance(publish, Publish)
    server.grant(subscribe, [SubackReturnCode.GRANTED_QOS_1])
    server.acknowledge(publish)
    response_id = server.publish("res/1", b"answer")
    assert pub_id is not None
    connack, suback, puback, response = pump(server, client)
    assert connack == Connack() and client.state is State.CONNECTED
    assert isinstance(suback, Suback) and suback.packet_id == sub_id and not client.pending(sub_id)
    assert puback == Puback(packet_id=pub_id) and client.inflight == 0
    assert isinstance(response, Publish) and response.packet_id == response_id and server.inflight == 1
    client.acknowledge(response)
    client.unsubscribe(["$dps/registrations/res/#"])
    client.ping()
    assert [type(p) for p in pump(client, server)] == [Puback, Unsubscribe, Pingreq]
    assert server.inflight == 0
    assert [type(p) for p in pump(server, client)] == [Unsuback, Pingresp]
    client.disconnect()
    assert pump(client, server) == [Disconnect()]
    assert (server.state, client.state) == (State.CLOSED, State.CLOSED)
    assert server.close_reason == "the client disconnected"
    assert server.feed_bytes(b"\xc0\x00") == []  # anything after DISCONNECT is discarded


def test_byte_at_a_time_gives_the_same_packets() -> None:
    clock = Clock()
    client, server = pair(clock)
    client.connect(client_id="dev")
    client.subscribe([Subscription(topic_filter="a")])
    client.publish("t", b"x" * 1000)
    data = client.get_outbound_data()
    got: list[Packet] = []
    for index in range(len(data)):
        got += server.feed_bytes(data[index : index + 1])
        if server.state is State.CONNECTING:
            server.accept()
            got += server.feed_bytes(b"")
    assert [type(p) for p in got] == [Connect, Subscribe, Publish]


@pytest.mark.parametrize(
    ("connect", "code"),
    [
        pytest.param(
            b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc",
            ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
            id="mqtt5",
        ),
        pytest.param(
            b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01a",
            ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
            id="mqtt31",
        ),
        pytest.param(
            encode_packet(Connect(client_id="", clean_session=False)),
            ConnectReturnCode.IDENTIFIER_REJECTED,
            id="empty-id-persistent",
        ),
    ],
)
def test_the_server_refuses_what_the_protocol_decides(connect: bytes, code: ConnectReturnCode) -> None:
    server = MqttConnection(Role.SERVER, clock=Clock())
    (packet,) = server.feed_bytes(connect + b"\xc0\x00")
    assert isinstance(packet, Connect) and server.state is State.CLOSED
    assert decode_all(server.get_outbound_data()) == (b"", Connack(return_code=code))
    assert server.close_reason and f"return code {int(code)}" in server.close_reason


def test_refused_connect_closes_both_sides() -> None:
    clock = Clock()
    client, server = pair(clock)
    client.connect(client_id="dev", username="u", password=b"bad")
    pump(client, server)
    server.refuse(ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, "the SAS token is malformed")
    assert server.state is State.CLOSED and "malformed" in (server.close_reason or "")
    (connack,) = pump(server, client)
    assert isinstance(connack, Connack) and client.state is State.CLOSED
    assert "return code 4" in (client.close_reason or "")


@pytest.mark.parametrize(
    ("role", "data", "words"),
    [
        pytest.param(
            Role.SERVER,
            b"\xc0\x00",
            r"client's first bytes b'\\xc0\\x00' are not a CONNECT packet",
            id="server-ping-before-connect",
        ),
        pytest.param(Role.SERVER, b"\x20\x02\x00\x00", "are not a CONNECT packet", id="server-gets-connack"),
        pytest.param(
            Role.SERVER,
            encode_packet(Connect(client_id="a")) + encode_packet(Connect(client_id="a")),
            "CONNECT packet is not allowed",
            id="second-connect",
        ),
        pytest.param(
            Role.SERVER,
            encode_packet(Connect(client_id="a")) + b"\x34\x05\x00\x01t\x00\x01",
            "QoS 2",
            id="qos2-publish",
        ),
        pytest.param(
            Role.SERVER,
            encode_packet(Connect(client_id="a"))
            + encode_packet(Suback(packet_id=1, return_codes=(SubackReturnCode(0),))),
            "SUBACK packet is not allowed",
            id="server-gets-suback",
        ),
    ],
)
def test_packets_out_of_place_are_remote_errors(role: Role, data: bytes, words: str) -> None:
    conn = MqttConnection(role, clock=Clock())
    with pytest.raises(RemoteProtocolError, match=words):
        conn.feed_bytes(data)
        conn.accept()
        conn.feed_bytes(b"")
    assert conn.state is State.CLOSED and conn.close_reason


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n",  # an HTTPS port ('H': a PUBACK's type)
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02id",  # a TLS echo: our own CONNECT
        b"\x00\x00\x00\x00",  # type 0 is reserved
    ],
)
def test_a_server_that_does_not_speak_mqtt_is_named_by_its_first_bytes(first: bytes) -> None:
    """Whatever a non-MQTT peer sends first, the client says what came instead of a CONNACK,
    before decoding it as a packet."""
    client = MqttConnection(Role.CLIENT, clock=Clock())
    client.connect(client_id="id")
    with pytest.raises(RemoteProtocolError) as refused:
        client.feed_bytes(first)
    assert refused.value.message == f"The server's first bytes {first[:32]!r} are not a CONNACK packet."
    assert client.state is State.CLOSED


def test_client_checks_acknowledgements() -> None:
    clock = Clock()
    client = MqttConnection(Role.CLIENT, clock=clock)
    client.connect(client_id="dev")
    client.feed_bytes(encode_packet(Connack()))
    client.subscribe([Subscription(topic_filter="a"), Subscription(topic_filter="b")])
    with pytest.raises(RemoteProtocolError, match="1 return codes for 2 topic filters"):
        client.feed_bytes(encode_packet(Suback(packet_id=1, return_codes=(SubackReturnCode.FAILURE,))))
    other = MqttConnection(Role.CLIENT, clock=clock)
    other.connect(client_id="dev")
    other.feed_bytes(encode_packet(Connack()))
    with pytest.raises(RemoteProtocolError, match="awaits no UNSUBACK"):
        other.feed_bytes(encode_packet(Unsuback(packet_id=5)))
    third = MqttConnection(Role.CLIENT, clock=clock)
    third.connect(client_id="dev")
    with pytest.raises(RemoteProtocolError, match="claims a session"):
        third.feed_bytes(encode_packet(Connack(session_present=True)))


def test_local_misuse_is_a_local_error() -> None:
    clock = Clock()
    client, server = pair(clock)
    with pytest.raises(LocalProtocolError):
        server.connect(client_id="x")
    with pytest.raises(LocalProtocolError):
        client.accept()
    with pytest.raises(LocalProtocolError):
        server.publish("t", b"")  # not connected yet
    with pytest.raises(LocalProtocolError):
        client.publish("t", qos=QoS.EXACTLY_ONCE)
    client.connect(client_id="x")
    pump(client, server)
    with pytest.raises(LocalProtocolError):
        server.refuse(ConnectReturnCode.ACCEPTED, "no")
    server.accept()
    with pytest.raises(LocalProtocolError, match="2 return codes for 1"):
        sub = Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="a"),))
        server.grant(sub, [SubackReturnCode.FAILURE, SubackReturnCode.FAILURE])


def test_inflight_is_bounded() -> None:
    clock = Clock()
    server = MqttConnection(Role.SERVER, clock=clock, max_inflight=2)
    server.feed_bytes(encode_packet(Connect(client_id="a")))
    server.accept()
    assert server.publish("t") == 1 and server.publish("t") == 2
    with pytest.raises(LocalProtocolError, match="await their PUBACK"):
        server.publish("t")
    server.feed_bytes(encode_packet(Puback(packet_id=1)) + encode_packet(Puback(packet_id=99)))
    assert server.publish("t") == 3 and server.publish("t", qos=QoS.AT_MOST_ONCE) is None


def test_server_deadlines_connect_timeout_and_keep_alive() -> None:
    clock = Clock()
    server = MqttConnection(Role.SERVER, clock=clock, connect_timeout=5)
    assert server.deadline() == 1005.0
    clock.now = 1004.9
    assert server.handle_deadline() is None
    clock.now = 1005.0
    assert server.handle_deadline() is Lapse.CONNECT_TIMEOUT and server.state is State.CLOSED
    assert server.close_reason == Lapse.CONNECT_TIMEOUT.value

    clock = Clock()
    server = MqttConnection(Role.SERVER, clock=clock, connect_timeout=5)
    server.feed_bytes(encode_packet(Connect(client_id="a", keep_alive=10)))
    assert server.deadline() is None  # the application is deciding
    server.accept()
    assert server.deadline() == 1015.0  # one and a half keep-alives after the last bytes
    clock.now = 1014
    server.feed_bytes(b"\xc0")  # half a PINGREQ is traffic too
    assert server.deadline() == 1029.0
    clock.now = 1029
    assert server.handle_deadline() is Lapse.KEEP_ALIVE
    assert server.close_reason == "the keep-alive lapsed (10 s)"

    clock = Clock()
    server = MqttConnection(Role.SERVER, clock=clock, connect_timeout=5)
    server.feed_bytes(encode_packet(Connect(client_id="a", keep_alive=0)))
    server.accept()
    assert server.deadline() is None  # keep-alive 0: the C SDK's; no limit


@pytest.mark.parametrize(
    ("keep_alive", "deadline", "reason"),
    [
        pytest.param(0, 1240.0, "nothing received within the idle timeout (240 s)", id="keep-alive-0"),
        pytest.param(
            3600, 1240.0, "nothing received within the idle timeout (240 s)", id="longer-keep-alive"
        ),
        pytest.param(60, 1090.0, "the keep-alive lapsed (60 s)", id="shorter-keep-alive"),
    ],
)
def test_server_max_idle_bounds_silence(keep_alive: int, deadline: float, reason: str) -> None:
    clock = Clock()
    server = MqttConnection(Role.SERVER, clock=clock, connect_timeout=5, max_idle=240)
    server.feed_bytes(encode_packet(Connect(client_id="a", keep_alive=keep_alive)))
    server.accept()
    assert server.deadline() == deadline
    clock.now = deadline
    assert server.handle_deadline() in (Lapse.IDLE, Lapse.KEEP_ALIVE)
    assert server.state is State.CLOSED and server.close_reason == reason


def test_pending_input_counts_an_incomplete_packet_only() -> None:
    server = MqttConnection(Role.SERVER, clock=Clock(), connect_timeout=5)
    server.feed_bytes(encode_packet(Connect(client_id="a")) + b"\xc0")
    assert server.pending_input == 0  # after a CONNECT the input waits for the application
    server.accept()
    assert server.feed_bytes(b"") == [] and server.pending_input == 1  # half a PINGREQ
    server.feed_bytes(b"\x00")
    assert server.pending_input == 0


def test_client_pings_then_gives_up() -> None:
    clock = Clock()
    client = MqttConnection(Role.CLIENT, clock=clock)
    client.connect(client_id="a", keep_alive=10)
    client.get_outbound_data()
    client.feed_bytes(encode_packet(Connack()))
    assert client.deadline() == 1010.0
    clock.now = 1010
    assert client.handle_deadline() is None
    assert client.get_outbound_data() == b"\xc0\x00"
    clock.now = 1015
    client.feed_bytes(b"\xd0\x00")  # PINGRESP
    clock.now = 1020
    assert client.handle_deadline() is None and client.get_outbound_data() == b"\xc0\x00"
    clock.now = 1030  # no answer to that one
    assert client.handle_deadline() is Lapse.KEEP_ALIVE and client.state is State.CLOSED


# --- properties ------------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
_topic = _text.filter(lambda t: t and "+" not in t and "#" not in t)
_filter = (
    st.lists(
        st.one_of(_text.filter(lambda t: "+" not in t and "#" not in t and "/" not in t), st.just("+")),
        min_size=1,
        max_size=4,
    )
    .map("/".join)
    .flatmap(lambda f: st.sampled_from([f, f + "/#"]) if f else st.just("#"))
)
_packet_id = st.integers(1, 0xFFFF)
_qos = st.sampled_from(QoS)


@st.composite
def _publish(draw: st.DrawFn) -> Publish:
    qos = draw(st.sampled_from([QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE]))
    return Publish(
        topic=draw(_topic),
        payload=draw(st.binary(max_size=300)),
        qos=qos,
        packet_id=draw(_packet_id) if qos else None,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
    )


@st.composite
def _connect(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | _text)
    return Connect(
        client_id=draw(_text),
        username=username,
        password=draw(st.none() | st.binary(max_size=50)) if username is not None else None,
        clean_session=draw(st.booleans()),
        keep_alive=draw(st.integers(0, 0xFFFF)),
        will=draw(
            st.none()
            | st.builds(Will, topic=_topic, message=st.binary(max_size=20), qos=_qos, retain=st.booleans())
        ),
    )


packets = st.one_of(
    _connect(),
    _publish(),
    st.builds(Connack, return_code=st.just(ConnectReturnCode.ACCEPTED), session_present=st.booleans()),
    st.builds(Connack, return_code=st.sampled_from(list(ConnectReturnCode)[1:])),
    st.builds(Puback, packet_id=_packet_id),
    st.builds(Unsuback, packet_id=_packet_id),
    st.builds(
        Subscribe,
        packet_id=_packet_id,
        subscriptions=st.lists(
            st.builds(Subscription, topic_filter=_filter, qos=_qos), min_size=1, max_size=3
        ).map(tuple),
    ),
    st.builds(
        Suback,
        packet_id=_packet_id,
        return_codes=st.lists(st.sampled_from(SubackReturnCode), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(
        Unsubscribe, packet_id=_packet_id, topic_filters=st.lists(_filter, min_size=1, max_size=3).map(tuple)
    ),
    st.builds(Pingreq),
    st.builds(Pingresp),
    st.builds(Disconnect),
)


@settings(max_examples=300, deadline=None)
@given(packet=packets, cut=st.integers(0, 10_000))
def test_property_round_trip_and_truncation(packet: Packet, cut: int) -> None:
    data = encode_packet(packet)
    assert decode_all(data) == (b"", packet)
    with pytest.raises(InsufficientData):
        decode_packet(memoryview(data)[: cut % len(data)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=64))
def test_property_decoder_parses_canonically_or_raises_the_protocol_error(data: bytes) -> None:
    try:
        rest, packet = decode_packet(memoryview(data))
    except (InsufficientData, RemoteProtocolError):
        return
    consumed = data[: len(data) - len(rest)]
    if not (isinstance(packet, Connect) and not packet.is_supported_version):
        assert encode_packet(packet) == consumed  # canonical grammar: one encoding per packet


# --- bounded fuzz ----------------------------------------------------------------------------------

FUZZ_SECONDS = 4.0
FUZZ_MAX_INPUTS = 60_000


def _valid_session() -> bytes:
    client = MqttConnection(Role.CLIENT, clock=Clock())
    client.connect(
        client_id="dev-1",
        username="0ne00000001/registrations/dev-1/api-version=2019-03-31",
        password=b"SharedAccessSignature sr=x&sig=y&se=1",
    )
    client.subscribe([Subscription(topic_filter="$dps/registrations/res/#")])
    client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", b'{"registrationId":"dev-1"}')
    client.publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=op", b" ")
    client.acknowledge(Publish(topic="t", qos=QoS.AT_LEAST_ONCE, packet_id=1))
    client.unsubscribe(["$dps/registrations/res/#"])
    client.ping()
    client.disconnect()
    return client.get_outbound_data()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip bits
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to something interesting
            buf[pos % len(buf)] = rng.choice([0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # delete a run
            del buf[pos : pos + rng.randint(1, 8)]
        else:  # duplicate a run
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 32)]
    return bytes(buf)


def _feed_server(data: bytes, chunk: int) -> None:
    server = MqttConnection(Role.SERVER, clock=Clock(), max_packet_size=4096, connect_timeout=5)
    try:
        for start in range(0, len(data), chunk):
            server.feed_bytes(data[start : start + chunk])
            if server.state is State.CONNECTING:
                server.accept()
                server.feed_bytes(b"")
            server.get_outbound_data()
    except RemoteProtocolError:
        assert server.state is State.CLOSED and server.close_reason


def test_fuzz_decoder_and_server_connection(capsys: pytest.CaptureFixture[str]) -> None:
    """Random bytes and mutated valid sessions, through the bare decoder and through a server
    connection in one chunk and byte by byte; bounded by count and time."""
    rng = random.Random(0x4D515454)
    session = _valid_session()
    deadline = time.monotonic() + FUZZ_SECONDS
    tried = parsed = 0
    while tried < FUZZ_MAX_INPUTS and time.monotonic() < deadline:
        data = _mutate(session, rng) if tried % 4 else rng.randbytes(rng.randint(0, 64))
        try:
            view = memoryview(data)
            while view:
                view, _ = decode_packet(view, max_packet_size=4096)
                parsed += 1
        except (InsufficientData, RemoteProtocolError):
            pass
        _feed_server(data, len(data) or 1)
        if tried % 16 == 0:
            _feed_server(data, 1)
        tried += 1
    assert tried >= 1000
    with capsys.disabled():
        print(f"\n[mqtt fuzz] decoder and server connection: {tried} inputs tried, {parsed} packets parsed")  # noqa: T201 (the report line)


def test_a_kept_session_is_announced_and_redeliveries_are_marked() -> None:
    """IoT Hub keeps sessions for clean-session 0 (the SDKs never subscribe again): CONNACK says
    session present, and a message the device may have seen before is sent with DUP."""
    clock = Clock()
    client, server = pair(clock)
    client.connect(client_id="dev", clean_session=False)
    pump(client, server)
    server.accept(session_present=True)
    server.publish("devices/dev/messages/devicebound/", b"again", dup=True)
    connack, publish = pump(server, client)
    assert connack == Connack(session_present=True) and client.state is State.CONNECTED
    assert isinstance(publish, Publish) and publish.dup and publish.qos is QoS.AT_LEAST_ONCE


def test_a_clean_session_has_no_session_present() -> None:
    clock = Clock()
    client, server = pair(clock)
    client.connect(client_id="dev", clean_session=True)
    pump(client, server)
    with pytest.raises(LocalProtocolError, match="MQTT-3.2.2-1"):
        server.accept(session_present=True)


def test_limits_change_once_the_server_knows_who_connected() -> None:
    """The DPS and IoT Hub endpoints share one MQTT port: the hub applies its own limits (larger
    packets, IoT Hub's idle cap, more publishes in flight) after the CONNECT."""
    clock = Clock()
    server = MqttConnection(Role.SERVER, clock=clock, max_packet_size=64, max_idle=240, max_inflight=1)
    server.feed_bytes(encode_packet(Connect(client_id="a", keep_alive=3600)))
    server.set_limits(max_packet_size=1024, max_idle=1767, max_inflight=2)
    server.accept()
    assert server.deadline() == 1000 + 1767
    big = Publish(topic="t", payload=b"x" * 200, qos=QoS.AT_MOST_ONCE)
    assert server.feed_bytes(encode_packet(big)) == [big]
    assert server.publish("t") == 1 and server.publish("t") == 2
    with pytest.raises(LocalProtocolError):
        server.publish("t")
    with pytest.raises(ValueError):
        server.set_limits(max_packet_size=1, max_idle=None, max_inflight=0)
