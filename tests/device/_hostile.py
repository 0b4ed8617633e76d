"""A hostile service on loopback TLS for the device client's tests: the test writes the
service's side (a connection handler), this serves it with the development PKI and yields a
client of one transport with a 1 s timeout and no retries."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from provisiond import pki
from provisiond.device import AsyncProvisioningDeviceClient, RetryPolicy, SymmetricKeySecurity

KEY = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM="
Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def hostile_service(
    session: Session, transport: str, tmp_path: Path
) -> AsyncIterator[AsyncProvisioningDeviceClient]:
    files = pki.ensure_dev_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)
    listener = await asyncio.start_server(session, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    client = AsyncProvisioningDeviceClient.create(
        f"localhost:{port}",
        "0ne00000001",
        SymmetricKeySecurity(registration_id="dev", symmetric_key=KEY),
        transport,
        ca_file=files.ca_file,
        timeout=1.0,
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        yield client
    finally:
        await client.close()
        listener.close()
