"""``python -m provisiond``: the same as the ``provisiond`` command."""

from __future__ import annotations

from .cli import main

# As the installed ``provisiond`` script does: a command's return value is the exit status.
raise SystemExit(main())
