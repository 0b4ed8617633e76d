"""provisiond._ids: random UUIDs as text, the same shape as ``str(uuid.uuid4())``."""

from __future__ import annotations

import os
import uuid

from provisiond._ids import uuid4_text


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
