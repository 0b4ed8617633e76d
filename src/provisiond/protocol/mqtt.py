"""MQTT 3.1.1, sans-io: the packet codec and the connection state machine, one implementation
for the service endpoint and the device client (as mqttproto shares ``_types`` between its
client and broker machines; mqttproto itself speaks only MQTT 5, DPS devices speak 3.1.1).

::

    from provisiond.protocol.mqtt import MqttConnection, Role

    server = MqttConnection(Role.SERVER, clock=time.monotonic, connect_timeout=10)
    for packet in server.feed_bytes(data):
        ...                                  # Connect -> server.accept() / server.refuse(code, why)
    stream.send(server.get_outbound_data())

* :mod:`._mqtt_wire`: the grammar's primitives (integers, strings, the remaining length), in
  the codec shape ``decode(memoryview) -> (rest, value)`` raising
  :class:`~provisiond.errors.InsufficientData`;
* :mod:`._mqtt_packets`: packets (frozen dataclasses), enums, :func:`decode_packet`;
* :mod:`._mqtt_connection`: :class:`MqttConnection` (both roles; its module opens with the
  theory of operation).

The DPS topics and the CONNECT user name live in :mod:`provisiond.protocol.topics`.
"""

from __future__ import annotations

from ._mqtt_connection import RECEIVE, SEND, Lapse, MqttConnection, Role, State
from ._mqtt_packets import (
    DEFAULT_MAX_PACKET_SIZE,
    PROTOCOL_LEVEL,
    PROTOCOL_NAME,
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    QoS,
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

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "PROTOCOL_LEVEL",
    "PROTOCOL_NAME",
    "RECEIVE",
    "SEND",
    "Connack",
    "Connect",
    "ConnectReturnCode",
    "Disconnect",
    "Lapse",
    "MqttConnection",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Publish",
    "QoS",
    "Role",
    "State",
    "Suback",
    "SubackReturnCode",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "decode_packet",
    "encode_packet",
]
