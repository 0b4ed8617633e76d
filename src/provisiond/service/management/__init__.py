"""The management layer: what an operator can do to the service, as typed operations over the
Store, shared by the REST API (service/api.py, service/admin.py), the CLI (through the REST
API and :mod:`provisiond.service_client`, whose typed clients mirror these names) and a future
web console (which calls these directly).

::

    management = Management(store, builtin_hub=..., invalidate=ctx.invalidate)
    page = await management.enrollments.query("SELECT * FROM enrollments WHERE provisioningStatus = 'enabled'")
    await management.enrollments.set_provisioning_status("dev-1", ProvisioningStatus.DISABLED)

Operations take and return the msgspec models of :mod:`provisiond.models` (secrets stripped
from reads, as DPS shows them), keep DPS's etag rules (create without an etag, update on one,
``*`` for "whatever is there", conditional writes retried where the service itself read the
etag), and raise :class:`~provisiond.errors.ProvisioningError` subclasses carrying their
:class:`~provisiond.errors.DpsCode`. A write that changes what the registration path caches
(settings, linked hubs, enrollment groups) calls ``invalidate``. Nothing here knows HTTP: no Starlette, no
headers (tests/service/test_management.py checks that).

| Attribute | Operations |
|---|---|
| ``enrollments`` | get, put, create, modify, set_provisioning_status, delete, attestation_mechanism, query, bulk |
| ``groups`` | the same, for enrollment groups |
| ``registrations`` | get, delete, query (the records of a group's devices) |
| ``hubs`` | list, get, put, delete; devices, device, delete_device (built-in hubs) |
| ``certificates`` | list, get, upload, delete, generate_verification_code, verify |
| ``policies`` | list, get (keys on request), put, delete |
| ``hub_policies`` | the same, for a built-in hub's policies (``list(hub)``, ``get(hub, name)``, ...) |
| ``settings`` | get, update |
"""

from __future__ import annotations

from collections.abc import Callable

from ...hub import BuiltinHub, HubBackends
from ...hub.policies import HubPolicies
from ...models import LinkedHub
from ...storage import Store
from ._base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page
from ._deprovision import Deprovisioner
from .certificates import CaCertificates
from .enrollments import EnrollmentGroups, IndividualEnrollments
from .hubs import CredentialCheck, LinkedHubs, read_linked_hubs
from .policies import AccessPolicies
from .registrations import Registrations, registration_state
from .settings import SETTINGS_KEY, ServiceSettingsManager, read_service_settings, validate_id_scope

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "SETTINGS_KEY",
    "AccessPolicies",
    "CaCertificates",
    "EnrollmentGroups",
    "IndividualEnrollments",
    "LinkedHubs",
    "Management",
    "Page",
    "Registrations",
    "ServiceSettingsManager",
    "read_linked_hubs",
    "read_service_settings",
    "registration_state",
    "validate_id_scope",
]


def _nothing_cached() -> None:
    pass


class Management:
    """Every management operation of one service, over its store."""

    def __init__(
        self,
        store: Store,
        *,
        builtin_hub: str,
        invalidate: Callable[[], None] = _nothing_cached,
        hubs: HubBackends | None = None,
        check_hub: CredentialCheck | None = None,
    ) -> None:
        """:param hubs: the hub backends (deprovisioning); default: the built-in hub over ``store``.
        :param check_hub: checks a remote hub's credential when it is linked (default: a read
            of its registry, :func:`provisiond.hub.connection.check_credential`)."""
        self.store = store
        deprovisioner = Deprovisioner(store, hubs or HubBackends(BuiltinHub(store)), self._linked_hubs)
        self.registrations = Registrations(store, deprovisioner)
        self.enrollments = IndividualEnrollments(store, self._linked_hubs, self.registrations, deprovisioner)
        self.groups = EnrollmentGroups(store, self._linked_hubs, deprovisioner, invalidate=invalidate)
        self.hubs = LinkedHubs(store, builtin_hub=builtin_hub, invalidate=invalidate, check=check_hub)
        self.certificates = CaCertificates(store, invalidate)
        self.policies = AccessPolicies(store, invalidate)
        self.hub_policies = HubPolicies(store)
        self.settings = ServiceSettingsManager(store, invalidate)

    async def _linked_hubs(self) -> dict[str, LinkedHub]:
        """What enrollments may name (always read afresh: a hub linked a moment ago counts)."""
        return await read_linked_hubs(self.store)
