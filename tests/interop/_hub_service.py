"""The service side of the hub interop tests. Desired patches go through the hub's service REST
API with the official Python service SDK (``azure-iot-hub``'s ``IoTHubRegistryManager.update_twin``,
``PATCH /twins/{id}``): the server tells the connected device. Methods and cloud-to-device
messages, whose service calls are another part's, come from a second node on the server's
database: a store and a hub broker on an event loop in a thread of its own (the SDKs' calls
block the test's thread); they reach the device through the broker's signal stream, as they
would from another ``provisiond serve``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from provisiond.hub.messages import CloudToDeviceMessage, c2d_to, decode_event, encode_c2d, partition
from provisiond.service.hub_broker import HubBroker
from provisiond.storage import Store, Stream, open_store, utc_iso
from tests._server import RunningServer


class ServiceSide:
    """The service side, as a second node on the server's database: a store and a broker on an
    event loop in a thread of its own (the SDK's calls block)."""

    def __init__(self, hub: RunningServer) -> None:
        from azure.iot.hub import IoTHubRegistryManager

        # msrest (requests) trusts the server's CA through REQUESTS_CA_BUNDLE: set by the fixture.
        self.manager = IoTHubRegistryManager.from_connection_string(hub.info["hubConnectionString"])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store: Store = open_store(f"sqlite:///{hub.data_dir / 'provisiond.db'}")
        self.run(self.store.open())
        self.broker = HubBroker(self.store)
        self.run(self.broker.start())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    def submit(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def patch_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        """A desired patch through the hub's REST API; the new desired ``$version``."""
        from azure.iot.hub.models import Twin, TwinProperties

        twin = self.manager.update_twin(device_id, Twin(properties=TwinProperties(desired=patch)), "*")
        return int(twin.properties.desired["$version"])

    def wait_disconnected(self, device_id: str, timeout: float = 15.0) -> None:
        """Until the hub has seen the device go (its identity's connectionState, read through
        the service SDK): a change made after that is one made while it was away."""
        deadline = time.monotonic() + timeout
        while self.manager.get_device(device_id).connection_state != "Disconnected":
            assert time.monotonic() < deadline, f"the hub still has {device_id} connected"
            time.sleep(0.05)

    def send_c2d(self, hub: str, device_id: str, body: bytes, **properties: str) -> str:
        message = CloudToDeviceMessage(
            message_id=uuid.uuid4().hex,
            to=c2d_to(device_id),
            enqueued_time=utc_iso(time.time()),
            properties=dict(properties),
            body=body,
        )
        self.run(self.store.append(Stream.HUB_C2D, [(partition(hub, device_id), encode_c2d(message))]))
        self.run(self.broker.notify_c2d(hub, device_id))
        return message.message_id

    def close(self) -> None:
        self.run(self.broker.close())
        self.run(self.store.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def events_of(service: ServiceSide, hub_name: str, device_id: str) -> Callable[[], list[Any]]:
    def read() -> list[Any]:
        entries = service.run(
            service.store.read(Stream.HUB_EVENTS, partition=partition(hub_name, device_id), limit=1000)
        )
        return [decode_event(entry.doc) for entry in entries]

    return read
