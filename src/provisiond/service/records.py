"""The registration record: one stored model, and the views the two APIs show.

The fields are declared once, layered: the service API's
:class:`~provisiond.models.DeviceRegistrationState` (``GET /registrations/{id}``), the device
API's :class:`~provisiond.protocol.messages.DeviceRegistrationResult` (those fields plus
``x509``, ``symmetricKey``, ``tpm``), and the stored :class:`RegistrationRecord` (those plus
what the service needs to answer polls and re-registrations). A view is a projection of the
stored record onto one of the wire shapes, with what the store owns filled in (the id as first
written, the etag, the timestamps).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from ..hub import Planned
from ..models import AttestationType, DeviceRegistrationState, RegistrationStatus
from ..protocol.messages import DeviceRegistrationResult, RegistrationOperationStatus
from ..storage import Collection, Record, Write, WriteMode

__all__ = [
    "RegistrationRecord",
    "decode",
    "device_view",
    "operation_view",
    "service_view",
    "write",
]


class RegistrationRecord(DeviceRegistrationResult, kw_only=True):
    """The registration record as stored: what the device is told, plus what the service
    needs to answer polls and re-registrations."""

    #: The register operation that wrote the record (polls name it).
    operation_id: str | None = None
    #: The group the device registered through (the symmetric-key search tries it first).
    enrollment_group_id: str | None = None
    attestation_type: AttestationType | None = None

    @property
    def is_assigned(self) -> bool:
        return self.status is RegistrationStatus.ASSIGNED and bool(self.assigned_hub)


def decode(record: Record) -> RegistrationRecord:
    return msgspec.json.decode(record.doc, type=RegistrationRecord)


ViewT = TypeVar("ViewT", bound=DeviceRegistrationState)


def _view(record: Record, shape: type[ViewT], stored: RegistrationRecord | None = None) -> ViewT:
    stored = stored if stored is not None else decode(record)
    fields = {name: getattr(stored, name) for name in shape.__struct_fields__}
    fields.update(
        registration_id=record.id,
        etag=record.etag,
        created_date_time_utc=stored.created_date_time_utc or record.created,
        last_updated_date_time_utc=record.updated,
    )
    return shape(**fields)


def service_view(record: Record) -> DeviceRegistrationState:
    """The record as the service API shows it (``GET /registrations/{id}``, queries)."""
    return _view(record, DeviceRegistrationState)


def device_view(record: Record) -> DeviceRegistrationResult:
    """The record as the device API shows it (status lookup, ``registrationState``)."""
    return _view(record, DeviceRegistrationResult)


def operation_view(record: Record) -> RegistrationOperationStatus:
    """The answer to a register or a poll: the operation that wrote the record, its status and
    the device's view of the record."""
    stored = decode(record)
    assert stored.status is not None and stored.operation_id is not None
    return RegistrationOperationStatus(
        operation_id=stored.operation_id,
        status=stored.status,
        registration_state=_view(record, DeviceRegistrationResult, stored),
    )


def write(registration_id: str, state: RegistrationRecord, previous: Record | None) -> Planned:
    """The record's write: a create, or an update on the etag read before (a concurrent
    change makes it fail, and nothing of its transaction is written)."""
    index = {
        "device_id": state.device_id,
        "status": state.status.value if state.status else None,
        "assigned_hub": state.assigned_hub,
        "enrollment_group_id": state.enrollment_group_id.lower() if state.enrollment_group_id else None,
        "operation_id": state.operation_id,
    }
    doc = msgspec.json.encode(state)
    if previous is None:
        return Collection.REGISTRATIONS, Write(registration_id, doc, index, WriteMode.CREATE)
    return Collection.REGISTRATIONS, Write(
        registration_id, doc, index, WriteMode.UPDATE, previous.etag, index_before=previous.index
    )
