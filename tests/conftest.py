"""Shared fixtures. The database ones (PostgreSQL server, fresh databases, ``store``) live in
``tests/_postgres.py``."""

from __future__ import annotations

pytest_plugins = ["tests._postgres", "tests._server", "tests._swtpm", "tests._inprocess", "tests._hub_peer"]
