"""provisiond._ids: random UUIDs as text, the same shape as ``str(uuid.uuid4())``, and random
integers below a bound (the built-in hub's numeric identifiers)."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from provisiond._ids import random_below, uuid4_text
from provisiond.hub.models import new_device_etag, new_generation_id


def test_uuid4_text_is_a_random_version_4_uuid_as_uuid_writes_it() -> None:
    made = [uuid4_text() for _ in range(2000)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # lower-case, hyphens where uuid puts them
    # Every random bit varies: over 2,000 ids, each of the 122 is set in some and clear in others.
    ints = [uuid.UUID(text).int for text in made]
    fixed = (0xF << 76) | (0x3 << 62)  # the version and variant bits
    varying = 0
    for value in ints:
        varying |= value ^ ints[0]
    assert varying == ((1 << 128) - 1) & ~fixed


def test_a_forked_child_does_not_make_its_parents_next_ids() -> None:
    uuid4_text()  # the buffer holds unused bytes now
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(reader)
        os.write(writer, " ".join(uuid4_text() for _ in range(50)).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [uuid4_text() for _ in range(50)]
    assert len(child) == 50 and not set(child) & set(parent)


def test_random_below_stays_below_its_bound_and_reaches_every_value() -> None:
    drawn = [random_below(7) for _ in range(2000)]
    assert set(drawn) == set(range(7))
    large = [random_below(9 * 10**17) for _ in range(2000)]
    assert all(0 <= value < 9 * 10**17 for value in large) and len(set(large)) == len(large)
    assert max(large) > 8 * 10**17 and min(large) < 10**17  # spread over the range, not its start
    for bound in (0, -1, 1 << 64):
        with pytest.raises(ValueError):
            random_below(bound)


def test_the_hubs_numeric_identifiers_have_iot_hubs_shapes() -> None:
    generations = [new_generation_id() for _ in range(500)]
    assert all(len(g) == 18 and g.isdigit() and g[0] != "0" for g in generations)
    assert len(set(generations)) == 500
    etags = [base64.b64decode(new_device_etag()) for _ in range(500)]
    assert all(len(e) == 9 and e.isdigit() and e[:1] != b"0" for e in etags)
