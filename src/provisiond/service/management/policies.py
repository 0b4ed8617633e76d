"""Shared access policies: named key pairs with rights on the service API. The service never
lets the last policy with ServiceConfig go (nobody could administer it any more)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from ...errors import ConflictError, DpsCode, InvalidBodyError
from ...models import Right, SharedAccessPolicy
from ...storage import Collection, Record, Store
from ..enrollments import check_key, generate_key
from ._base import delete_record, get_or_404, put_record
from .certificates import validate_name

__all__ = ["AccessPolicies"]


def _present(record: Record, *, keys: bool = False) -> SharedAccessPolicy:
    policy = msgspec.json.decode(record.doc, type=SharedAccessPolicy)
    if not keys:
        policy = msgspec.structs.replace(policy, primary_key=None, secondary_key=None)
    return msgspec.structs.replace(policy, etag=record.etag)


def _administers(policy: SharedAccessPolicy | None) -> bool:
    return policy is not None and Right.SERVICE_CONFIG in (policy.rights or [])


class AccessPolicies:
    """List, get (with or without keys), create or update, and delete policies."""

    def __init__(self, store: Store, invalidate: Callable[[], None]) -> None:
        self._store = store
        self._invalidate = invalidate

    async def list(self) -> list[SharedAccessPolicy]:
        """Every policy, keys stripped."""
        return [_present(r) for r in await self._store.query_all(Collection.ACCESS_POLICIES)]

    async def get(self, name: str, *, keys: bool = False) -> SharedAccessPolicy:
        """One policy; its keys only when asked (``listKeys``). :raises NotFoundError: 404206."""
        return _present(await self._get_record(name), keys=keys)

    async def _get_record(self, name: str) -> Record:
        return await get_or_404(self._store, Collection.ACCESS_POLICIES, name, DpsCode.POLICY_NOT_FOUND)

    def validate_name(self, name: str) -> str:
        return validate_name(name, "policy name")

    async def put(
        self, name: str, policy: SharedAccessPolicy, *, if_match: str | None = None
    ) -> SharedAccessPolicy:
        """Create or update ``name`` (If-Match as for every admin record; ``None``: the policy's
        own ``etag``). Keys not given are kept, or generated for a new policy. Returns the
        policy with its keys.

        :raises InvalidIdError, InvalidBodyError: a bad name, no rights, a bad key.
        :raises ConflictError: 409000, it would leave no policy with ServiceConfig; or it
            exists and no etag was given. :raises PreconditionFailedError: a stale etag.
        """
        self.validate_name(name)
        if policy.key_name.lower() != name.lower():
            raise InvalidBodyError(
                f"keyName {policy.key_name[:80]!r} in the body differs from {name!r} in the URL."
            )
        if not policy.rights:
            raise InvalidBodyError(
                "rights must list at least one right: " + ", ".join(r.value for r in Right)
            )
        existing = await self._store.get(Collection.ACCESS_POLICIES, name)
        old = msgspec.json.decode(existing.doc, type=SharedAccessPolicy) if existing else None
        if _administers(old) and Right.SERVICE_CONFIG not in policy.rights:
            if await self._administrators_besides(name) == 0:
                raise ConflictError(
                    f"Removing ServiceConfig from {name!r} would leave no policy that can administer the service."
                )
        doc = SharedAccessPolicy(
            key_name=name,
            rights=sorted(set(policy.rights), key=lambda r: r.value),
            primary_key=policy.primary_key or (old.primary_key if old else None) or generate_key(),
            secondary_key=policy.secondary_key or (old.secondary_key if old else None) or generate_key(),
        )
        check_key(doc.primary_key or "", "primaryKey")
        check_key(doc.secondary_key or "", "secondaryKey")
        record = await put_record(
            self._store,
            Collection.ACCESS_POLICIES,
            name,
            msgspec.json.encode(doc),
            if_match or policy.etag,
            invalidate=self._invalidate,
        )
        return _present(record, keys=True)

    async def delete(self, name: str, *, if_match: str | None = None) -> None:
        """:raises NotFoundError: 404206. :raises ConflictError: 409000, the last policy with
        ServiceConfig. :raises PreconditionFailedError: 412000."""
        policy = msgspec.json.decode((await self._get_record(name)).doc, type=SharedAccessPolicy)
        if _administers(policy) and await self._administrators_besides(name) == 0:
            raise ConflictError(f"Deleting {name!r} would leave no policy that can administer the service.")
        try:
            await delete_record(
                self._store, Collection.ACCESS_POLICIES, name, if_match, not_found=DpsCode.NOT_FOUND
            )
        finally:
            self._invalidate()

    async def _administrators_besides(self, name: str) -> int:
        """How many policies other than ``name`` hold ServiceConfig."""
        count = 0
        for record in await self._store.query_all(Collection.ACCESS_POLICIES):
            policy = msgspec.json.decode(record.doc, type=SharedAccessPolicy)
            if policy.key_name.lower() != name.lower() and _administers(policy):
                count += 1
        return count
