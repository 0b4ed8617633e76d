"""AMQP 1.0 (OASIS), sans-io: the type codec, frames, performatives and the connection state
machine, shared by the service endpoint and the device client."""

from __future__ import annotations
