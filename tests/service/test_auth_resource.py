"""Which ``sr`` a service token may give (service/auth.py): the service's names, with or without
a port, IPv6 addresses whole, a path prefix matched segment by segment, and never an empty host."""

from __future__ import annotations

import pytest

from provisiond.service.auth import _resource_matches

NAMES = ("dps.example", "localhost", "127.0.0.1", "::1")


@pytest.mark.parametrize(
    ("resource", "path", "matches"),
    [
        ("dps.example", "/enrollments/a", True),
        ("DPS.example:443", "/enrollments/a", True),
        ("https://localhost:8443/enrollments", "/enrollments/a", True),
        ("localhost/enrollments/b", "/enrollments/a", False),
        ("::1", "/x", True),
        ("127.0.0.1:8443", "/x", True),
        ("other.example", "/x", False),
        ("", "/x", False),
        ("/enrollments", "/enrollments/a", False),  # no host at all
        (":8443", "/x", False),
    ],
)
def test_a_token_names_this_service(resource: str, path: str, matches: bool) -> None:
    assert _resource_matches(resource, NAMES, path) is matches
