"""Service API authentication: SAS tokens signed with a shared access policy key (DPS's
policies for the service and admin APIs, a built-in hub's for that hub's API).

A token's ``sr`` must name this service (one of its host names, with or without the port, or a
path prefix of the request matched segment by segment): for the DPS service and admin APIs the
names ``serve`` knows (``--host`` and the names its server certificate covers), never the
``Host`` header the client sent, so that a token made for another service that shares a key
(a staging copy of the database) is not accepted here; ``skn`` must name a policy, ``sig`` must
verify under one of the policy's keys, and ``se`` must not be in the past (beyond a small clock
skew). The policy must hold the right the operation needs. Each failure says which.
"""

from __future__ import annotations

import msgspec

from ..errors import AuthenticationError, AuthorizationError, DpsCode
from ..hub.policies import HubAccessPolicy, HubPolicies, HubRight, grants
from ..models import Right, SharedAccessPolicy
from ..protocol.sas import SasToken, parse_sas_token, verify_signature
from ..storage import Collection, Store

__all__ = ["authorize", "authorize_hub"]


def _resource_matches(resource: str, host_names: tuple[str, ...], path: str) -> bool:
    res = resource.lower().strip()
    for prefix in ("https://", "http://"):
        res = res.removeprefix(prefix)
    host, _, res_path = res.partition("/")
    if not host or _without_port(host) not in {_without_port(h.lower()) for h in host_names}:
        return False
    if not res_path:
        return True
    want = [s for s in res_path.split("/") if s]
    have = [s for s in path.lower().split("/") if s]
    return have[: len(want)] == want


def _without_port(host: str) -> str:
    """``host`` without a ``:port`` (an IPv6 address, with more than one colon, stays whole)."""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def authorize(
    store: Store,
    authorization: str | None,
    right: Right,
    *,
    host_names: tuple[str, ...],
    path: str,
    now: int,
    clock_skew: int,
) -> SharedAccessPolicy:
    """Check a service request's ``Authorization`` header; return the policy that signed it.

    :raises AuthenticationError: missing, malformed, expired, forged, or for another service.
    :raises AuthorizationError: the policy lacks ``right``.
    """
    token = _service_token(authorization, host_names, path, now, clock_skew, "this service")
    assert token.key_name is not None
    record = await store.get(Collection.ACCESS_POLICIES, token.key_name)
    if record is None:
        raise AuthenticationError(
            f"No shared access policy is named {token.key_name[:128]!r}.", error_code=DpsCode.UNKNOWN_POLICY
        )
    policy = msgspec.json.decode(record.doc, type=SharedAccessPolicy)
    keys = [k for k in (policy.primary_key, policy.secondary_key) if k]
    if not any(verify_signature(token, key) for key in keys):
        raise AuthenticationError(
            f"The SAS token's signature does not match either key of policy {policy.key_name!r}.",
            error_code=DpsCode.TOKEN_INVALID,
        )
    if right not in (policy.rights or []):
        raise AuthorizationError(
            f"Policy {policy.key_name!r} lacks the {right.value} right this operation needs.",
            error_code=DpsCode.MISSING_RIGHT,
        )
    return policy


def _service_token(
    authorization: str | None,
    host_names: tuple[str, ...],
    path: str,
    now: int,
    clock_skew: int,
    audience: str,
) -> SasToken:
    """The parsed token of a service request, with a policy name, not expired, for this
    service. :raises AuthenticationError: which check failed."""
    if not authorization:
        raise AuthenticationError("The Authorization header is missing; send a SharedAccessSignature token.")
    token = parse_sas_token(authorization)
    if token.key_name is None:
        raise AuthenticationError("The SAS token has no skn: name the shared access policy that signed it.")
    if token.expiry + clock_skew < now:
        raise AuthenticationError(
            f"The SAS token expired {now - token.expiry} s ago (se={token.expiry}).",
            error_code=DpsCode.TOKEN_EXPIRED,
        )
    if not _resource_matches(token.resource, host_names, path):
        raise AuthenticationError(
            f"The SAS token is for resource {token.resource[:200]!r}, not {audience}.",
            error_code=DpsCode.TOKEN_AUDIENCE,
        )
    return token


async def authorize_hub(
    policies: HubPolicies,
    authorization: str | None,
    rights: tuple[HubRight, ...],
    *,
    hub: str,
    request_host: str,
    path: str,
    now: int,
    clock_skew: int,
) -> HubAccessPolicy:
    """Check a request to a built-in hub's service API: a token signed with one of the hub's
    policies (``sr``: the hub's host name, or the host the request was sent to), holding any of
    ``rights``. A device's token (no ``skn``) is refused: the hub serves no device REST API.

    :raises AuthenticationError: missing, malformed, expired, forged, or for another hub.
    :raises AuthorizationError: the policy holds none of ``rights`` (IoT Hub answers 401).
    """
    token = _service_token(authorization, (hub, request_host), path, now, clock_skew, f"IoT hub {hub!r}")
    assert token.key_name is not None
    policy = await policies.find(hub, token.key_name)
    if policy is None:
        raise AuthenticationError(
            f"IoT hub {hub!r} has no shared access policy named {token.key_name[:128]!r}.",
            error_code=DpsCode.UNKNOWN_POLICY,
        )
    keys = [k for k in (policy.primary_key, policy.secondary_key) if k]
    if not any(verify_signature(token, key) for key in keys):
        raise AuthenticationError(
            f"The SAS token's signature does not match either key of policy {policy.key_name!r}.",
            error_code=DpsCode.TOKEN_INVALID,
        )
    if not grants(policy, rights):
        wanted = " or ".join(right.value for right in rights)
        raise AuthorizationError(
            f"Policy {policy.key_name!r} lacks the {wanted} right this operation needs.",
            error_code=DpsCode.MISSING_RIGHT,
        )
    return policy
