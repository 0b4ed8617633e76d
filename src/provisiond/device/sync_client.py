"""The blocking device client: a thin facade over :class:`AsyncProvisioningDeviceClient`
(as mqttproto's sync client is), so the logic exists once.

Each client has its own event loop, created on first use and closed by
:meth:`ProvisioningDeviceClient.close` (or when the client is garbage-collected). A blocking call
runs that loop in the calling thread when the thread runs no event loop of its own, so a
registration costs no thread hop; called from a thread that already runs one (a notebook, a
GUI), it runs the loop in a short-lived daemon thread and waits for it. Calls on one client go
one at a time. Nothing is left running between calls, so an unclosed client never keeps the
interpreter alive. The loops' blocking work (name resolution) goes to one thread pool shared by
the process's sync clients, so that a client does not start and join a worker thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import weakref
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from ..protocol.registration import RegistrationResult, RetryPolicy
from .async_client import AsyncProvisioningDeviceClient
from .security import SecurityProvider
from .transport import DEFAULT_API_VERSION, Transport, TransportKind

__all__ = ["ProvisioningDeviceClient"]

T = TypeVar("T")


class _SharedExecutor(ThreadPoolExecutor):
    """The default executor of every sync client's loop. A loop shuts its default executor down
    when it closes; this one outlives the loops, so that shutdown is a no-op."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


_executors: dict[int, _SharedExecutor] = {}
_executors_lock = threading.Lock()


def _shared_executor() -> _SharedExecutor:
    """This process's pool (a forked child makes its own: the parent's threads are not in it);
    ThreadPoolExecutor's default size, its threads started as needed."""
    pid = os.getpid()
    with _executors_lock:
        executor = _executors.get(pid)
        if executor is None:
            _executors.clear()
            executor = _executors[pid] = _SharedExecutor(thread_name_prefix="provisiond-device-worker")
        return executor


class _PrivateLoop:
    """A client's event loop, run by the calling thread (or, when that thread runs a loop of its
    own, by a short-lived daemon thread), one call at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(_shared_executor())
                self._loop = loop
                self._finalizer = weakref.finalize(self, _close, loop)
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # the usual case: a plain thread
                in_a_loop = False
            else:
                in_a_loop = True
            return _run_in_thread(self._loop, coro) if in_a_loop else _run(self._loop, coro)

    def stop(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._loop = self._finalizer = None


def _run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:  # KeyboardInterrupt included: don't leave the coroutine half-done
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
        raise


def _run_in_thread(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, _run(loop, coro)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="provisiond-device", daemon=True)
    thread.start()
    try:
        thread.join()
    except BaseException:  # KeyboardInterrupt while waiting: cancel what runs there
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        thread.join()
        raise
    ok, value = outcome[0]
    if ok:
        result: T = value
        return result
    raise value


def _close(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_running() and not loop.is_closed():
        loop.close()


class ProvisioningDeviceClient:
    """Registers one device with a provisioning service (blocking).

    ::

        with ProvisioningDeviceClient.create(endpoint, id_scope, security, ca_file=ca) as client:
            result = client.register({"model": "x1"})

    :param async_client: the client this one drives (see :meth:`create`).
    """

    def __init__(self, *, async_client: AsyncProvisioningDeviceClient) -> None:
        self._async = async_client
        self._loop = _PrivateLoop()

    @classmethod
    def create(
        cls,
        global_endpoint: str,
        id_scope: str,
        security: SecurityProvider,
        transport: TransportKind | str | Transport = TransportKind.HTTPS,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        api_version: str = DEFAULT_API_VERSION,
    ) -> ProvisioningDeviceClient:
        """Same as :meth:`AsyncProvisioningDeviceClient.create`."""
        return cls(
            async_client=AsyncProvisioningDeviceClient.create(
                global_endpoint,
                id_scope,
                security,
                transport,
                ca_file=ca_file,
                ssl_context=ssl_context,
                timeout=timeout,
                retry=retry,
                api_version=api_version,
            )
        )

    @property
    def security(self) -> SecurityProvider:
        return self._async.security

    def register(self, payload: Any = None, *, force: bool = False) -> RegistrationResult:
        """Same as :meth:`AsyncProvisioningDeviceClient.register`, blocking."""
        return self._loop.run(self._async.register(payload, force=force))

    def close(self) -> None:
        """Close the transport's connections and the client's event loop."""
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> ProvisioningDeviceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ProvisioningDeviceClient {self._async.security!r} via {self._async.transport!r}>"
