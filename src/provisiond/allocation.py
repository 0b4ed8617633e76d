"""Allocation: which linked hub a device goes to. Pure.

Candidates are the enrollment's ``iotHubs`` (or its legacy ``iotHubHostName``) when it names
any, otherwise every linked hub whose ``applyAllocationPolicy`` is true. Policies:

- ``static``: the one hub the enrollment names.
- ``hashed``: weighted rendezvous hashing over the candidates: deterministic per registration id
  (a device re-registering lands on the same hub), proportional to ``allocationWeight``, and
  stable when hubs come and go (only the devices of a removed hub move).
- ``geoLatency``: the candidates nearest to the region of the node that answered (``serve
  --region``; distances in :mod:`.regions`), then weighted rendezvous hashing among them, as
  ``hashed``: hubs at the same distance tie, and the tie goes by weight and hash, the same on
  every node. Without a region, or when no candidate's location has a known distance to it,
  every candidate is nearest (geoLatency allocates as ``hashed``).
- ``custom``: the enrollment's webhook, which the registrar calls (``service/webhook.py``);
  :func:`allocate` only reports that it cannot choose for it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from .models import AllocationPolicy, LinkedHub
from .regions import distance_km

__all__ = ["AllocationError", "allocate", "candidate_hubs", "nearest_hubs"]


class AllocationError(Exception):
    """No hub can be chosen; the message says why. (Internal: the registrar turns it into a
    failed registration with DPS's errorCode 400208.)"""


def candidate_hubs(named: Sequence[str], linked: Mapping[str, LinkedHub]) -> list[LinkedHub]:
    """The hubs an enrollment may be assigned to (``named``: its iotHubs, possibly empty)."""
    if named:
        return [linked[h.lower()] for h in dict.fromkeys(named) if h.lower() in linked]
    return [hub for hub in linked.values() if hub.apply_allocation_policy is not False]


def nearest_hubs(region: str | None, candidates: Sequence[LinkedHub]) -> list[LinkedHub]:
    """The candidates nearest to ``region`` (the answering node's), in their order: those whose
    ``location`` is at the least known distance from it; every candidate when ``region`` is
    ``None`` or no candidate is at a known distance."""
    distances = [distance_km(region, hub.location) for hub in candidates]
    known = [d for d in distances if d is not None]
    if not known:
        return list(candidates)
    least = min(known)
    return [hub for hub, d in zip(candidates, distances, strict=True) if d == least]


def _score(registration_id: str, hub: LinkedHub) -> float:
    digest = hashlib.sha256(f"{registration_id.lower()}\0{hub.host_name.lower()}".encode()).digest()
    # A uniform number in (0, 1) from 53 bits of the hash.
    u = (int.from_bytes(digest[:8], "big") >> 11) + 1
    unit = u / float((1 << 53) + 1)
    return -(hub.allocation_weight or 1) / math.log(unit)


def allocate(
    policy: AllocationPolicy,
    registration_id: str,
    candidates: Sequence[LinkedHub],
    *,
    named: Sequence[str] = (),
    region: str | None = None,
) -> LinkedHub:
    """Choose a hub for ``registration_id``; ``region``: the answering node's (geoLatency).

    :raises AllocationError: no candidate, or a policy that cannot be applied.
    """
    if not candidates:
        if named:
            raise AllocationError(
                f"None of the enrollment's IoT hubs ({', '.join(named)}) is linked to this service."
            )
        raise AllocationError(
            "No linked IoT hub takes part in allocation (applyAllocationPolicy is false on every hub)."
        )
    match policy:
        case AllocationPolicy.STATIC:
            if not named:
                raise AllocationError(
                    "The static allocation policy needs the enrollment to name its IoT hub (iotHubs)."
                )
            return candidates[0]
        case AllocationPolicy.HASHED:
            return _hashed(registration_id, candidates)
        case AllocationPolicy.GEO_LATENCY:
            return _hashed(registration_id, nearest_hubs(region, candidates))
        case AllocationPolicy.CUSTOM:
            raise AllocationError(
                "Custom allocation is decided by the enrollment's webhook, not by allocate()."
            )
    raise AssertionError(policy)  # pragma: no cover


def _hashed(registration_id: str, candidates: Sequence[LinkedHub]) -> LinkedHub:
    """Weighted rendezvous hashing (the host name breaks an exact tie of scores)."""
    if len(candidates) == 1:  # the usual single hub: no score to compute
        return candidates[0]
    return max(candidates, key=lambda hub: (_score(registration_id, hub), hub.host_name))
