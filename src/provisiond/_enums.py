"""An :class:`enum.Enum` hashed by identity, for enums read on every packet or statement.

:class:`enum.Enum` hashes a member with a Python function (``hash(self._name_)``); as a dict key
or a cache argument that is a Python call per lookup. A member is a singleton that equals only
itself, so the identity hash (``object.__hash__``, a C slot) is consistent with its equality.
Not for enums mixed with a value type (``StrEnum``, ``IntEnum``): their members equal plain
values, whose hash is the value's.
"""

from __future__ import annotations

import enum

__all__ = ["IdentityEnum"]


class IdentityEnum(enum.Enum):
    """An enum whose members hash by identity (see the module docstring)."""

    __hash__ = object.__hash__
