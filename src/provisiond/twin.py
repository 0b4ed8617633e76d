"""Device twins as IoT Hub keeps them, pure: the stored document, the patches the device and the
service make, the version counters, and the shapes each side reads (iothub.md §1.6, §3.4).

Theory of operation
-------------------
A twin has three sections, **tags** (service only), **desired** properties (written by the
service, read by the device) and **reported** properties (written by the device, read by the
service), and three counters, as IoT Hub keeps them:

* ``version``: the twin's, bumped on every change of any section;
* ``desired_version`` (``properties.desired.$version``): bumped on every desired change, sent to
  the device with each desired patch (``$version`` in the topic and the body) and in every GET;
* ``reported_version`` (``properties.reported.$version``): bumped on every reported patch and
  returned in the topic of the device's 204.

Patches follow JSON merge-patch rules: objects merge member by member, ``null`` deletes a
member, anything else replaces. Every write is checked against IoT Hub's limits
(:mod:`provisiond.twin_limits`: key rules, depth, size per section) on the document it would
produce, so that a stored twin always keeps them; a patch that breaks one is refused whole and
changes nothing (:class:`~provisiond.errors.TwinLimitError`).

Each section keeps ``$metadata`` the way IoT Hub shows it: ``$lastUpdated`` of the section and
of each top-level member (and ``$lastUpdatedVersion`` on the desired side). Nothing here reads a
clock: the time is passed in.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import InvalidBodyError
from .twin_limits import TwinSection, check_section

__all__ = [
    "NEVER",
    "Twin",
    "device_view",
    "desired_changes",
    "desired_notification",
    "initial",
    "merge_patch",
    "patch_desired",
    "patch_reported",
    "replace",
    "section_view",
    "twin_etag",
    "update_tags",
]

#: How IoT Hub writes "never" in dates (iothub.md §3.3).
NEVER = "0001-01-01T00:00:00Z"

Json = dict[str, Any]


class Twin(msgspec.Struct, rename="camel", kw_only=True):
    """The stored twin of one device identity."""

    tags: Json = msgspec.field(default_factory=dict)
    desired: Json = msgspec.field(default_factory=dict)
    reported: Json = msgspec.field(default_factory=dict)
    version: int = 1
    desired_version: int = 1
    reported_version: int = 1
    #: ``$metadata``: when each top-level member of a section was last written (and, on the
    #: desired side, at which desired version), and when the section itself was.
    desired_updated: Json = msgspec.field(default_factory=dict)
    reported_updated: Json = msgspec.field(default_factory=dict)
    desired_last_updated: str = NEVER
    reported_last_updated: str = NEVER


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> Json:
    """``target`` with ``patch`` merged in (a new dict; neither argument changes): objects merge
    member by member, ``None`` deletes the member, anything else replaces it."""
    merged: Json = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_patch(merged[key], value)
        elif isinstance(value, Mapping):
            merged[key] = merge_patch({}, value)  # drop the nulls inside a new object
        else:
            merged[key] = value
    return merged


def _require_object(patch: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(patch, Mapping):
        raise InvalidBodyError(f"The {what} must be a JSON object, not {type(patch).__name__}.")
    for key in patch:
        if isinstance(key, str) and key.startswith("$"):
            raise InvalidBodyError(
                f"The {what} cannot write {key[:64]!r}: members starting with '$' are IoT Hub's."
            )
    return patch


def _touched(updated: Mapping[str, Any], patch: Mapping[str, Any], stamp: Any) -> Json:
    result = dict(updated)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = stamp
    return result


def initial(tags: Mapping[str, Any] | None, desired: Mapping[str, Any] | None, *, now: str) -> Twin:
    """A new identity's twin: the initial tags and desired properties DPS applies at assignment.

    :raises TwinLimitError: they break IoT Hub's limits.
    """
    twin = Twin()
    if tags:
        twin = update_tags(twin, tags, now=now)
    if desired:
        twin = patch_desired(twin, desired, now=now)
    # The twin is born with them: every counter starts at 1 (the device's first GET reads $version 1).
    return msgspec.structs.replace(
        twin,
        version=1,
        desired_version=1,
        desired_updated={key: [now, 1] for key in twin.desired},
    )


def patch_reported(twin: Twin, patch: Any, *, now: str) -> Twin:
    """The device's reported-properties PATCH.

    :raises InvalidBodyError: the patch is not an object, or writes a ``$`` member.
    :raises TwinLimitError: the result would break IoT Hub's limits.
    """
    patch = _require_object(patch, "reported properties patch")
    reported = merge_patch(twin.reported, patch)
    check_section(reported, TwinSection.REPORTED)
    return msgspec.structs.replace(
        twin,
        reported=reported,
        reported_version=twin.reported_version + 1,
        version=twin.version + 1,
        reported_updated=_touched(twin.reported_updated, patch, now),
        reported_last_updated=now,
    )


def patch_desired(twin: Twin, patch: Any, *, now: str) -> Twin:
    """The service's desired-properties patch (``PATCH /twins/{id}`` with ``properties.desired``).

    :raises InvalidBodyError: the patch is not an object, or writes a ``$`` member.
    :raises TwinLimitError: the result would break IoT Hub's limits.
    """
    patch = _require_object(patch, "desired properties patch")
    desired = merge_patch(twin.desired, patch)
    check_section(desired, TwinSection.DESIRED)
    version = twin.desired_version + 1
    return msgspec.structs.replace(
        twin,
        desired=desired,
        desired_version=version,
        version=twin.version + 1,
        desired_updated=_touched(twin.desired_updated, patch, [now, version]),
        desired_last_updated=now,
    )


def update_tags(twin: Twin, patch: Any, *, now: str) -> Twin:
    """The service's tags patch (merged like the properties).

    :raises InvalidBodyError: the patch is not an object, or writes a ``$`` member.
    :raises TwinLimitError: the result would break IoT Hub's limits.
    """
    patch = _require_object(patch, "tags patch")
    tags = merge_patch(twin.tags, patch)
    check_section(tags, TwinSection.TAGS)
    return msgspec.structs.replace(twin, tags=tags, version=twin.version + 1)


def replace(twin: Twin, tags: Any, desired: Any, *, now: str) -> Twin:
    """``PUT /twins/{id}``: tags and desired properties replaced whole (reported stays).

    :raises InvalidBodyError: a section is not an object, or writes a ``$`` member.
    :raises TwinLimitError: the result would break IoT Hub's limits.
    """
    new_tags = dict(_require_object(tags if tags is not None else {}, "tags"))
    new_desired = merge_patch(
        {}, _require_object(desired if desired is not None else {}, "desired properties")
    )
    check_section(new_tags, TwinSection.TAGS)
    check_section(new_desired, TwinSection.DESIRED)
    version = twin.desired_version + 1
    return msgspec.structs.replace(
        twin,
        tags=merge_patch({}, new_tags),
        desired=new_desired,
        desired_version=version,
        version=twin.version + 1,
        desired_updated=dict.fromkeys(new_desired, [now, version]),
        desired_last_updated=now,
    )


def desired_changes(before: Twin, after: Twin) -> Json | None:
    """What a device must be told after a desired write: the members that changed (``None`` for
    deleted ones), or ``None`` when nothing did."""
    changes: Json = {}
    for key in before.desired.keys() | after.desired.keys():
        old, new = before.desired.get(key), after.desired.get(key)
        if old != new:
            changes[key] = new
    return changes or None


def desired_notification(changes: Mapping[str, Any], version: int) -> Json:
    """The body of ``$iothub/twin/PATCH/properties/desired/?$version={n}``: the patch with
    ``$version`` (the Python SDK reads it from every patch, iothub.md §1.6)."""
    return {**changes, "$version": version}


def device_view(twin: Twin) -> Json:
    """What the device reads with ``$iothub/twin/GET``: the properties only, each section with
    its ``$version`` (no tags, no metadata: IoT Hub's MQTT GET answer)."""
    return {
        "desired": {**twin.desired, "$version": twin.desired_version},
        "reported": {**twin.reported, "$version": twin.reported_version},
    }


def _metadata(values: Mapping[str, Any], updated: Mapping[str, Any], last: str, *, desired: bool) -> Json:
    meta: Json = {"$lastUpdated": last}
    for key in values:
        stamp = updated.get(key)
        if desired and isinstance(stamp, list) and len(stamp) == 2:
            meta[key] = {"$lastUpdated": stamp[0], "$lastUpdatedVersion": stamp[1]}
        elif isinstance(stamp, str):
            meta[key] = {"$lastUpdated": stamp}
        else:
            meta[key] = {"$lastUpdated": last}
    return meta


def section_view(twin: Twin) -> Json:
    """``properties`` as the service API shows it: each section with ``$metadata`` and ``$version``."""
    desired_meta = _metadata(twin.desired, twin.desired_updated, twin.desired_last_updated, desired=True)
    desired_meta["$lastUpdatedVersion"] = twin.desired_version
    return {
        "desired": {**twin.desired, "$metadata": desired_meta, "$version": twin.desired_version},
        "reported": {
            **twin.reported,
            "$metadata": _metadata(
                twin.reported, twin.reported_updated, twin.reported_last_updated, desired=False
            ),
            "$version": twin.reported_version,
        },
    }


def twin_etag(twin: Twin) -> str:
    """The twin's etag, in IoT Hub's shape (base64 of an 8-byte counter, ``"AAAAAAAAAAE="``),
    derived from ``version`` so that every change gives a new one."""
    return base64.b64encode(twin.version.to_bytes(8, "big")).decode("ascii")
