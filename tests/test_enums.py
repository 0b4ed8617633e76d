"""provisiond._enums: enums hashed by identity keep an enum's equality, lookups and pickling."""

from __future__ import annotations

import pickle

from provisiond._enums import IdentityEnum
from provisiond.protocol._mqtt_connection import State
from provisiond.storage import Collection


class Color(IdentityEnum):
    RED = "red"
    BLUE = "blue"


def test_members_hash_by_identity_and_still_look_up_and_compare_as_enum_members() -> None:
    table = {Color.RED: 1, Color.BLUE: 2}
    assert table[Color("red")] == 1 and table[Color["BLUE"]] == 2
    assert hash(Color.RED) == object.__hash__(Color.RED)
    assert Color.RED != "red" and "red" not in table  # a member equals only itself
    for member in (Color.RED, State.CONNECTED, Collection.REGISTRATIONS):
        again = pickle.loads(pickle.dumps(member))
        assert again is member and hash(again) == hash(member)
