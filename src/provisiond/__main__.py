"""``python -m provisiond``: the same as the ``provisiond`` command."""

from __future__ import annotations

from .cli import main

main()
