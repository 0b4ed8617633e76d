"""Admission: how many connections each TLS listener takes, in all and from one source address,
out of the process's open files.

Every accepted connection holds a file descriptor. With the common soft limit of 1,024 open
files, a thousand idle TCP connections used to take every descriptor: ``accept()`` then failed on
all listeners and the database could not open a file. So:

* :func:`raise_open_file_limit` lifts the soft limit to the hard one when ``serve`` starts (the
  banner says what it got);
* :func:`resolve` turns the configured caps into numbers: unless set, a listener may hold an
  equal share of the open files less a reserve (``--fd-reserve``), and one source address a
  quarter of that;
* an :class:`Admission` per listener counts its connections, per address too, and refuses a
  connection over a cap at once, before the TLS handshake, with a :class:`ThrottledLog` line;
* the :class:`DescriptorBudget` of the process counts the connections of all listeners, so
  that, whatever the caps say, the reserve stays free for the database, the log and outgoing
  connections (webhooks, PostgreSQL).

Counts are per worker process (each has its own descriptors). Deadlines, which end connections
that hold a slot without doing anything, are in :mod:`provisiond.service.guard`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass

from .settings import ConnectionLimits

__all__ = [
    "Admission",
    "DescriptorBudget",
    "OpenFileLimit",
    "ThrottledLog",
    "open_file_limit",
    "process_budget",
    "raise_open_file_limit",
    "resolve",
]

log = logging.getLogger("provisiond.admission")

#: What a soft limit is raised to when the hard limit is "unlimited" (Linux refuses more than
#: fs.nr_open, usually 1,048,576; macOS more than OPEN_MAX).
_UNLIMITED_TARGET = 1 << 20


@dataclass(frozen=True, slots=True)
class OpenFileLimit:
    """The process's open-file limit: the soft limit found at start, and the one now in force."""

    before: int
    soft: int
    hard: int

    @property
    def raised(self) -> bool:
        return self.soft > self.before


_RAISED: OpenFileLimit | None = None


def open_file_limit() -> OpenFileLimit:
    """What :func:`raise_open_file_limit` did in this process (or the limit now, if it did not run)."""
    if _RAISED is not None:
        return _RAISED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFileLimit(before=soft, soft=soft, hard=hard)


def raise_open_file_limit() -> OpenFileLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit (worker processes inherit it)."""
    global _RAISED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    _RAISED = OpenFileLimit(before=soft, soft=now, hard=hard)
    return _RAISED


def _soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def resolve(limits: ConnectionLimits, *, listeners: int, open_files: int | None = None) -> ConnectionLimits:
    """``limits`` with numbers for the caps left to the open-file limit: each of ``listeners``
    gets an equal share of ``open_files`` (default: the current soft limit) less the reserve, and
    an address a quarter of its listener's cap. A cap of 0 stays 0 (none)."""
    per_listener = limits.max_connections
    if per_listener is None:
        usable = (open_files if open_files is not None else _soft_limit()) - limits.fd_reserve
        per_listener = max(1, usable // max(1, listeners))
    per_address = limits.max_connections_per_address
    if per_address is None:
        per_address = max(1, per_listener // 4) if per_listener else 0
    return dataclasses.replace(limits, max_connections=per_listener, max_connections_per_address=per_address)


class DescriptorBudget:
    """The connections of every listener of this process against its open-file limit less the
    reserve. One per process: :func:`process_budget`."""

    def __init__(self, *, limit: int, reserve: int) -> None:
        self.limit = limit
        self.reserve = reserve
        #: Client connections held now, all listeners together.
        self.in_use = 0

    @property
    def capacity(self) -> int:
        """How many client connections this process may hold at once."""
        return max(0, self.limit - self.reserve)

    def exhausted(self) -> bool:
        return self.in_use >= self.capacity


_BUDGET: DescriptorBudget | None = None


def process_budget(reserve: int) -> DescriptorBudget:
    """This process's budget (made on first use, from the soft limit then in force)."""
    global _BUDGET
    if _BUDGET is None:
        _BUDGET = DescriptorBudget(limit=_soft_limit(), reserve=reserve)
    return _BUDGET


class ThrottledLog:
    """At most ``burst`` lines per ``interval`` seconds; what is held back is counted by kind
    and reported in one line when the interval ends. A flood of refusals or closes then costs a
    few lines, and none goes unmentioned."""

    def __init__(self, logger: logging.Logger, name: str, *, interval: float = 10.0, burst: int = 10) -> None:
        self._logger = logger
        self._name = name
        self._interval = interval
        self._burst = burst
        self._window_end = 0.0
        self._lines = 0
        self._held: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` (prefixed with the listener's name) unless the interval's
        lines are used up; then count it under ``kind``."""
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now >= self._window_end:
            self._report_held()
            self._window_end = now + self._interval
            self._lines = 0
        if self._lines < self._burst:
            self._lines += 1
            self._logger.log(level, "%s %s", self._name, message % args if args else message)
            return
        self._held[kind] += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # reported with the next line instead
            self._timer = loop.call_later(self._window_end - now, self._report_held)

    def _report_held(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        total = sum(self._held.values())
        kinds = ", ".join(f"{kind}: {count}" for kind, count in self._held.most_common())
        self._logger.warning(
            "%s: %d more like the above in the last %g s, not logged one by one (%s)",
            self._name,
            total,
            self._interval,
            kinds,
        )
        self._held.clear()


class Admission:
    """The connections of one listener: the per-listener cap, the per-address cap and the
    process's :class:`DescriptorBudget`. :meth:`admit` before the TLS handshake, :meth:`release`
    when the connection is gone."""

    def __init__(
        self, name: str, limits: ConnectionLimits, *, budget: DescriptorBudget, events: ThrottledLog
    ) -> None:
        resolved = resolve(limits, listeners=1, open_files=budget.limit)
        self.name = name
        self.cap = resolved.max_connections or None
        self.per_address = resolved.max_connections_per_address or None
        self.budget = budget
        self._events = events
        #: Connections held now, and per source address.
        self.open = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        """Take a slot for a connection from ``address``; False (and a log line) when over a cap."""
        held = self._by_address.get(address, 0)
        if self.cap is not None and self.open >= self.cap:
            why, kind = f"this listener holds {self.open} connections (--max-connections {self.cap})", "full"
        elif self.per_address is not None and held >= self.per_address:
            why = f"{held} connections from that address (--max-connections-per-address {self.per_address})"
            kind = "per address"
        elif self.budget.exhausted():
            why = (
                f"the process holds {self.budget.in_use} connections, all its open files "
                f"({self.budget.limit}) but the reserve (--fd-reserve {self.budget.reserve})"
            )
            kind = "open files"
        else:
            self.open += 1
            self.budget.in_use += 1
            self._by_address[address] = held + 1
            return True
        self._events.log(
            logging.WARNING, f"refused ({kind})", "refused a connection from %s: %s", address, why
        )
        return False

    def release(self, address: str) -> None:
        """Give back the slot :meth:`admit` took for a connection from ``address``."""
        self.open -= 1
        self.budget.in_use -= 1
        held = self._by_address.pop(address, 1) - 1
        if held:
            self._by_address[address] = held
