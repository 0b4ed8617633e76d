"""The asyncio device client: drives :func:`~provisiond.protocol.registration.registration_flow`
over a :class:`~provisiond.device.transport.Transport` and does the waiting. It holds no
protocol logic of its own; the sync client is a facade over this one."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..errors import TransportError
from ..protocol.registration import (
    AnswerChallenge,
    RegistrationResult,
    RetryPolicy,
    Sleep,
    registration_flow,
)
from .security import SecurityProvider
from .transport import DEFAULT_API_VERSION, HttpsTransport, Transport, TransportKind

__all__ = ["AsyncProvisioningDeviceClient"]

logger = logging.getLogger(__name__)


class AsyncProvisioningDeviceClient:
    """Registers one device with a provisioning service (asyncio).

    Build it with :meth:`create`, or directly from a transport::

        async with AsyncProvisioningDeviceClient.create(endpoint, id_scope, security, ca_file=ca) as client:
            result = await client.register({"model": "x1"})

    :param security: the device's credential.
    :param transport: carries the requests (its lifetime is the client's).
    :param retry: how hard to try when the service is busy or failing.
    :param clock: monotonic seconds, for the retry policy's total timeout.
    :param random: a float in [0, 1), for backoff jitter.
    """

    def __init__(
        self,
        *,
        security: SecurityProvider,
        transport: Transport,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.security = security
        self.transport = transport
        self.retry = retry or RetryPolicy()
        self._clock = clock
        self._random = random

    @classmethod
    def create(
        cls,
        global_endpoint: str,
        id_scope: str,
        security: SecurityProvider,
        transport: TransportKind | str | Transport = TransportKind.HTTPS,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        api_version: str = DEFAULT_API_VERSION,
    ) -> AsyncProvisioningDeviceClient:
        """A client for the service at ``global_endpoint`` (``host`` or ``host:port``), the shape
        of the Azure SDK's ``ProvisioningDeviceClient.create``.

        :param transport: ``"https"``, ``"mqtt"``, ``"mqtt-ws"``, ``"amqp"`` or ``"amqp-ws"``
            (:class:`TransportKind`; MQTT's default port is 8883, AMQP's 5671, over WebSockets
            443), or a ready :class:`Transport`
            (then ``global_endpoint``, ``id_scope``, ``ca_file``, ``ssl_context``, ``timeout``
            and ``api_version`` are the transport's business and ignored here).
        :param ca_file: PEM file of the CAs to trust for the service's certificate.
        :param ssl_context: a TLS context to use instead (the client certificate is loaded into it).
        :param timeout: seconds for each network operation.
        :raises ValueError: an unknown transport name, or a malformed endpoint.
        :raises ConfigurationError: the CA file or the client certificate cannot be loaded.
        """
        if not isinstance(transport, Transport):
            kind = _transport_kind(transport)
            common: dict[str, Any] = {
                "host": global_endpoint,
                "id_scope": id_scope,
                "security": security,
                "ca_file": ca_file,
                "ssl_context": ssl_context,
                "timeout": timeout,
                "api_version": api_version,
            }
            # MQTT and AMQP (their codecs) are imported by the devices that use them only
            if kind is TransportKind.HTTPS:
                transport = HttpsTransport(**common)
            elif kind in (TransportKind.MQTT, TransportKind.MQTT_WS):
                from .mqtt import MqttTransport

                transport = MqttTransport(websockets=kind is TransportKind.MQTT_WS, **common)
            else:
                from .amqp import AmqpTransport

                transport = AmqpTransport(websockets=kind is TransportKind.AMQP_WS, **common)
        return cls(security=security, transport=transport, retry=retry)

    async def register(self, payload: Any = None, *, force: bool = False) -> RegistrationResult:
        """Register the device and wait for the outcome.

        :param payload: custom JSON data for the service's allocation (``payload``).
        :param force: send DPS's ``forceRegistration`` flag (HTTPS, AMQP). Neither DPS nor
            provisiond needs it: every register runs the assignment again under the
            enrollment's reprovisioning policy (docs/device-api.md, "forceRegistration").
        :returns: the result, with status ``assigned``.
        :raises RegistrationFailedError: the registration ended ``failed`` or ``disabled``.
        :raises ServiceResponseError: the service refused (4xx), or kept answering 429/5xx.
        :raises RemoteProtocolError: the service's answer is malformed.
        :raises provisiond.errors.TimeoutError: no outcome within the retry policy's total timeout
            (also raised when the service does not answer a request in time).
        :raises ConnectError: cannot connect (refused, unknown host, TLS handshake failed).
        """
        registration_id = self.security.registration_id
        flow = registration_flow(
            registration_id,
            tpm=self.security.begin_registration(),
            payload=payload,
            force=force,
            policy=self.retry,
            clock=self._clock,
            random=self._random,
            answers_challenges=self.security.answers_challenges,
        )
        try:
            command = next(flow)
            while True:
                if isinstance(command, Sleep):
                    await asyncio.sleep(command.seconds)
                    command = flow.send(None)
                elif isinstance(command, AnswerChallenge):
                    await asyncio.to_thread(self.security.answer_challenge, command.challenge)
                    command = flow.send(None)
                else:
                    try:
                        reply = await self.transport.send(command)
                    except TransportError as exc:
                        command = flow.throw(exc)
                    else:
                        command = flow.send(reply)
        except StopIteration as stop:
            result: RegistrationResult = stop.value
        finally:
            flow.close()
        if type(self.security).complete_registration is not SecurityProvider.complete_registration:
            # a TPM imports the hub key here (blocking); the base's no-op needs no thread hop
            await asyncio.to_thread(self.security.complete_registration, result)
        logger.info(
            "%s registered: %s to %s as %s",
            registration_id,
            result.status.value,
            result.assigned_hub,
            result.device_id,
        )
        return result

    async def close(self) -> None:
        """Close the transport's connections."""
        await self.transport.close()

    async def __aenter__(self) -> AsyncProvisioningDeviceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncProvisioningDeviceClient {self.security!r} via {self.transport!r}>"


def _transport_kind(value: TransportKind | str) -> TransportKind:
    try:
        return TransportKind(value.lower() if isinstance(value, str) else value)
    except ValueError:
        names = ", ".join(kind.value for kind in TransportKind)
        raise ValueError(f"Unknown transport {value!r}; this client speaks {names}.") from None
