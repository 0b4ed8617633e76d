"""The twin over one device's MQTT connection to a built-in hub (:mod:`provisiond.service.hub_mqtt`):
the device's twin requests (``$iothub/twin/GET/?$rid=`` answered ``200`` with the device's view
of the twin; a reported-properties PATCH answered ``204`` with ``&$version={new reported
version}``; errors their status with a JSON body carrying ``errorCode``, what the Node.js SDK
reads, and ``message``), and the desired-property patches published to it, in version order
whichever process committed them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .. import twin as twins
from ..errors import IotHubCode, LocalProtocolError, ProvisioningError, RequestError
from ..hub.registry import HubRegistry
from ..protocol import bounded_json
from ..protocol.hub_topics import Filter, PublicationKind, desired_patch_topic, twin_response_topic
from ..protocol.messages import error_body
from ..protocol.mqtt import Publish, QoS
from ..storage import utc_iso
from .hub_c2d import DeviceConnection

__all__ = ["DESIRED_GAP_WAIT", "TwinChannel"]

log = logging.getLogger("provisiond.hub")

#: Seconds a desired patch waits for an earlier version's (relayed from another process within
#: the broker's poll interval) before it goes out without it.
DESIRED_GAP_WAIT = 0.5
_json = msgspec.json.Encoder()


class TwinChannel:
    """One connection's twin: requests answered, desired patches published in order."""

    def __init__(
        self, connection: DeviceConnection, registry: HubRegistry, clock: Callable[[], float]
    ) -> None:
        self._connection = connection
        self._registry = registry
        self._clock = clock
        # Desired patches go out in version order, whichever process committed them (a write
        # in another worker or node is relayed through the signal stream, later than a local
        # one): the newest version published (the twin's at CONNECT before any), and the
        # patches waiting for the versions before them.
        self.desired_version = 0
        self._desired_waiting: dict[int, Mapping[str, Any]] = {}
        self._desired_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._desired_timer is not None:
            self._desired_timer.cancel()

    # --- requests of the device --------------------------------------------------------------------

    async def answer(self, publish: Publish, kind: PublicationKind, rid: str) -> None:
        """A twin GET or reported-properties PATCH of the device (already acknowledged)."""
        connection = self._connection
        hub, device_id = connection.hub, connection.device_id
        try:
            if kind is PublicationKind.TWIN_GET:
                device = await self._registry.get_twin(hub, device_id)  # 404001
                self._respond(200, rid, _json.encode(twins.device_view(device.twin)))
            else:
                try:
                    patch = bounded_json.decode(publish.payload)
                except msgspec.DecodeError as exc:
                    raise RequestError(
                        f"The reported properties patch is not JSON: {exc}",
                        error_code=IotHubCode.ARGUMENT_INVALID,
                    ) from None
                version = await self._registry.patch_reported(hub, device_id, patch)
                self._respond(204, rid, b"", version=version)
        except ProvisioningError as exc:
            self._error(rid, kind, exc)

    def _respond(self, status: int, rid: str, body: bytes, *, version: int | None = None) -> None:
        # Answered whether or not the device subscribed to $iothub/twin/res/# (then at QoS 0):
        # the Python SDK sends its "ensure desired properties" GET on connect without that
        # subscription (pipeline_stages_iothub.EnsureDesiredPropertiesStage) and waits for it.
        qos = self._connection.granted(Filter.TWIN_RESPONSES) or QoS.AT_MOST_ONCE
        try:
            topic = twin_response_topic(status, rid, version)
        except LocalProtocolError as exc:
            log.info("MQTT %s: cannot answer $rid=%r: %s", self._connection.who, rid[:64], exc.message)
            return
        self._connection.publish(topic, body, qos)

    def _error(self, rid: str, kind: PublicationKind, exc: ProvisioningError) -> None:
        code = exc.iothub_code
        tracking_id = uuid.uuid4().hex
        level = logging.INFO if code.http_status < 500 else logging.ERROR
        log.log(
            level,
            "MQTT %s: %s $rid=%s: %d %s (tracking id %s)",
            self._connection.who,
            kind.value,
            rid[:64],
            code.http_status,
            exc.message,
            tracking_id,
        )
        body = error_body(code, tracking_id, exc.message, utc_iso(self._clock()))
        self._respond(code.http_status, rid, body)

    # --- desired patches -----------------------------------------------------------------------------

    def send_desired(self, changes: Mapping[str, Any], version: int) -> None:
        """Publish the desired patch of ``version`` once every earlier one is published (an
        empty one only moves the version on: a write that changed nothing); one older than
        the twin the device connected with is in the twin it reads. A version whose patch
        never comes (its notifier died, or a write that notifies nobody, such as DPS's
        re-provisioning) holds the later ones back for :data:`DESIRED_GAP_WAIT` at most."""
        if version <= self.desired_version:
            return
        self._desired_waiting[version] = changes
        self._release_desired(skip_gaps=False)

    def _release_desired(self, *, skip_gaps: bool) -> None:
        while self._desired_waiting:
            version = min(self._desired_waiting)
            if version != self.desired_version + 1 and not skip_gaps:
                break
            changes = self._desired_waiting.pop(version)
            self.desired_version = version
            qos = self._connection.granted(Filter.DESIRED_PATCHES)
            if changes and qos is not None:
                body = _json.encode(twins.desired_notification(changes, version))
                self._connection.publish(desired_patch_topic(version), body, qos)
        if not self._desired_waiting and self._desired_timer is not None:
            self._desired_timer.cancel()
            self._desired_timer = None
        elif self._desired_waiting and self._desired_timer is None:
            self._desired_timer = asyncio.get_running_loop().call_later(DESIRED_GAP_WAIT, self._desired_gap)

    def _desired_gap(self) -> None:
        self._desired_timer = None
        self._release_desired(skip_gaps=True)
