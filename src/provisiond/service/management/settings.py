"""The service settings: ID scope, default allocation policy, host names (Azure keeps them as
properties of the provisioningServices resource)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from ...errors import InvalidBodyError, NotFoundError
from ...models import AllocationPolicy, ServiceSettings, ServiceSettingsPatch
from ...storage import Store

__all__ = ["SETTINGS_KEY", "ServiceSettingsManager", "read_service_settings", "validate_id_scope"]

#: The key of the service settings among the store's settings.
SETTINGS_KEY = "service"

_ID_SCOPE = re.compile(r"^0ne[0-9A-Fa-f]{8}$")


def validate_id_scope(value: str) -> str:
    """``value`` if it is a DPS ID scope ('0ne' and 8 hex digits).

    :raises InvalidBodyError: it is not.
    """
    if not _ID_SCOPE.match(value):
        raise InvalidBodyError(f"Invalid ID scope {value[:40]!r}: DPS ID scopes are '0ne' and 8 hex digits.")
    return value


async def read_service_settings(store: Store) -> ServiceSettings:
    """The stored service settings.

    :raises NotFoundError: the database was never initialized.
    """
    raw = await store.get_setting(SETTINGS_KEY)
    if raw is None:
        raise NotFoundError("The service settings are missing: the database was not initialized.")
    return msgspec.json.decode(raw, type=ServiceSettings)


class ServiceSettingsManager:
    """Read and change the service settings."""

    def __init__(self, store: Store, invalidate: Callable[[], None]) -> None:
        self._store = store
        self._invalidate = invalidate

    async def get(self) -> ServiceSettings:
        return await read_service_settings(self._store)

    async def update(self, patch: ServiceSettingsPatch) -> ServiceSettings:
        """Set the fields ``patch`` gives (last writer wins, as for any setting).

        :raises InvalidBodyError: an ID scope that is not one, or ``custom`` as the default
            allocation policy (custom allocation needs a webhook, which only enrollments name).
        """
        current = await self.get()
        changes: dict[str, Any] = {}
        if patch.id_scope is not None:
            changes["id_scope"] = validate_id_scope(patch.id_scope)
        if patch.allocation_policy is not None:
            if patch.allocation_policy is AllocationPolicy.CUSTOM:
                raise InvalidBodyError(
                    "The service's default allocation policy cannot be custom; set it per enrollment."
                )
            changes["allocation_policy"] = patch.allocation_policy
        updated = msgspec.structs.replace(current, **changes)
        try:
            await self._store.set_setting(SETTINGS_KEY, msgspec.json.encode(updated).decode())
        finally:
            self._invalidate()
        return updated
