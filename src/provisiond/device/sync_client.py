"""The blocking device client: a thin facade over :class:`AsyncProvisioningDeviceClient`
(as mqttproto's sync client is), so the logic exists once.

The async client runs on an event loop in a private daemon thread, started on first use and
stopped by :meth:`ProvisioningDeviceClient.close` (or when the client is garbage-collected).
A daemon thread never keeps the interpreter alive, and the blocking calls work from any thread,
including one that already runs an event loop (a notebook, a GUI). The loops' blocking work
(name resolution) goes to one thread pool shared by the process's sync clients, so that a
client does not start and join a worker thread of its own.
"""

from __future__ import annotations

import asyncio
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
    """This process's pool (a forked child makes its own: the parent's threads are not in it)."""
    pid = os.getpid()
    with _executors_lock:
        executor = _executors.get(pid)
        if executor is None:
            _executors.clear()
            executor = _executors[pid] = _SharedExecutor(
                max_workers=4, thread_name_prefix="provisiond-device-worker"
            )
        return executor


class _LoopThread:
    """An event loop running in a daemon thread; coroutines are submitted to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._start()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: don't leave the coroutine running
            future.cancel()
            raise

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(_shared_executor())
                thread = threading.Thread(target=loop.run_forever, name="provisiond-device", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
                self._finalizer = weakref.finalize(self, _stop, loop, thread)
            return self._loop

    def stop(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._loop = self._thread = self._finalizer = None


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if thread is threading.current_thread():  # pragma: no cover - collected on its own loop
        loop.call_soon(loop.stop)
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
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
        self._loop = _LoopThread()

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
        """Close the transport's connections and stop the private event loop."""
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
