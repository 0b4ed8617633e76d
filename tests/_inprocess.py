"""The service in this process: ``create_app`` over a fresh store (once per backend: SQLite in
``tmp_path`` and the PostgreSQL server the tests start), reached through httpx's ASGI
transport, with no child process, socket or TLS. What the HTTPS APIs do with a request is
tested here; what the SDKs see over TLS (the auth header over a real connection, client
certificates, the interop tests) stays with the real server of ``tests/_server.py``.

The app's lifespan runs (its registrar's webhook client is closed after the test); the MQTT
and AMQP listeners are off (their ports are 0, and there is no server certificate).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from provisiond.protocol.sas import build_sas_token, derive_device_key
from provisiond.service.app import OWNER_POLICY, create_app, initialize, owner_key
from provisiond.service.management import Management
from provisiond.service.settings import Settings
from provisiond.storage import Store

__all__ = ["DEVICE_API", "SERVICE_API", "InProcess", "service"]

#: The api-version query parameter of the service and of the device API.
SERVICE_API = {"api-version": "2021-10-01"}
DEVICE_API = {"api-version": "2021-06-01"}
_HOST = "localhost:8443"


@dataclass
class InProcess:
    """The app under test and an HTTP client that speaks to it as the owner policy."""

    app: Starlette
    store: Store
    settings: Settings
    http: httpx.AsyncClient
    owner_key: str
    id_scope: str

    @property
    def management(self) -> Management:
        management: Management = self.app.state.ctx.management
        return management

    def token(
        self, *, ttl: int = 3600, key_name: str = OWNER_POLICY, key: str | None = None, resource: str = _HOST
    ) -> str:
        """A service SAS token (the owner's, unless told otherwise)."""
        return build_sas_token(resource, key or self.owner_key, int(time.time()) + ttl, key_name=key_name)

    def client(self, authorization: str | None = None) -> httpx.AsyncClient:
        """Another client of the app: anonymous, or with this Authorization header."""
        headers = {"Authorization": authorization} if authorization else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url=f"https://{_HOST}", headers=headers
        )

    async def register(self, registration_id: str, device_key: str) -> dict[str, Any]:
        """Register a symmetric key device through the device API; the registration state."""
        resource = f"{self.id_scope}/registrations/{registration_id}"
        token = build_sas_token(resource, device_key, int(time.time()) + 3600, key_name="registration")
        async with self.client(token) as device:
            r = await device.put(
                f"/{resource}/register", params=DEVICE_API, json={"registrationId": registration_id}
            )
        assert r.status_code in (200, 202) and r.json()["status"] == "assigned", r.text
        state: dict[str, Any] = r.json()["registrationState"]
        return state

    async def register_in_group(self, group_key: str, registration_id: str) -> dict[str, Any]:
        return await self.register(registration_id, derive_device_key(group_key, registration_id))


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[InProcess]:
    """The service over ``store`` (every backend), initialized as on a first start."""
    settings = Settings(data_dir=tmp_path, host="localhost", https_port=8443, mqtt_port=0, amqp_port=0)
    service_settings = await initialize(store, settings)
    assert service_settings.id_scope is not None
    app = create_app(settings, store=store)
    key = await owner_key(store)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        token = build_sas_token(_HOST, key, int(time.time()) + 3600, key_name=OWNER_POLICY)
        async with httpx.AsyncClient(
            transport=transport, base_url=f"https://{_HOST}", headers={"Authorization": token}
        ) as http:
            yield InProcess(app, store, settings, http, key, service_settings.id_scope)
