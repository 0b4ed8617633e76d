"""A linked hub's connection string and IoT Hub's error answers, pure (the link check itself is
tested over TLS in tests/service/test_hub_linking.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from provisiond.errors import ConfigurationError, InvalidBodyError
from provisiond.hub.connection import HubConnection, hub_error_text, parse_ca_certificate
from provisiond.hub.remote import RemoteHub
from provisiond.models import HubTier, LinkedHub
from provisiond.protocol.sas import parse_sas_token, verify_signature
from tests.factories import key, pem, root_ca

KEY = key(b"s")


def test_parse_a_service_connection_string() -> None:
    text = f" hostname=Hub.Azure-Devices.net ; SharedAccessKeyName=registryReadWrite;SharedAccessKey={KEY}; "
    connection = HubConnection.parse(text, host="hub.azure-devices.net")
    assert (connection.host, connection.port, connection.key_name) == (
        "Hub.Azure-Devices.net",
        None,
        "registryReadWrite",
    )
    assert connection.authority == "Hub.Azure-Devices.net"
    with_port = HubConnection.parse(f"HostName=localhost:8443;SharedAccessKeyName=p;SharedAccessKey={KEY}")
    assert with_port.port == 8443 and with_port.authority == "localhost:8443"
    assert KEY not in repr(connection) and KEY not in str(connection)


def test_the_token_is_iot_hubs_service_token() -> None:
    connection = HubConnection.parse(f"HostName=h.example.net;SharedAccessKeyName=p;SharedAccessKey={KEY}")
    token = parse_sas_token(connection.token(1_000_000, ttl=60))
    assert token.resource == "h.example.net" and token.key_name == "p" and token.expiry == 1_000_060
    assert verify_signature(token, KEY) and not verify_signature(token, key(b"x"))


def test_the_remote_backend_uses_the_same_connection_and_keeps_its_key_out_of_repr() -> None:
    """One connection client for the link check and the registry calls: the remote backend's
    connection is :class:`HubConnection` (key hidden), its refusal a ConfigurationError."""
    text = f"HostName=h.example.net:8443;SharedAccessKeyName=p;SharedAccessKey={KEY}"
    remote = RemoteHub(LinkedHub(host_name="h.example.net", connection_string=text))
    try:
        assert (
            isinstance(remote.connection, HubConnection)
            and remote.connection.authority == "h.example.net:8443"
        )
        assert KEY not in repr(remote.connection) and KEY not in repr(vars(remote))
        token = parse_sas_token(remote._authorization())
        assert token.resource == "h.example.net" and verify_signature(token, KEY)
    finally:
        asyncio.run(remote.aclose())
    with pytest.raises(ConfigurationError, match="SharedAccessKey") as refused:
        RemoteHub(
            LinkedHub(
                host_name="h.example.net", connection_string="HostName=h.example.net;SharedAccessKeyName=p"
            )
        )
    assert KEY not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            f"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY};DeviceId=d",
            "a device's connection string",
        ),
        (f"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY};Extra=1", "unknown part 'extra'"),
        ("HostName=h;SharedAccessKeyName=p", "lacks SharedAccessKey"),
        ("SharedAccessKeyName=p;SharedAccessKey=" + KEY, "lacks HostName"),
        ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=%%%", "not a base64 key"),
        (f"HostName=h:0;SharedAccessKeyName=p;SharedAccessKey={KEY}", "is not a port"),
        (f"HostName=h:x;SharedAccessKeyName=p;SharedAccessKey={KEY}", "is not a port"),
        ("just text", "Name=value"),
    ],
)
def test_malformed_connection_strings_name_the_part_never_the_key(text: str, words: str) -> None:
    with pytest.raises(InvalidBodyError, match=words) as caught:
        HubConnection.parse(text)
    assert KEY not in str(caught.value)


def test_the_connection_string_names_the_linked_hub() -> None:
    with pytest.raises(InvalidBodyError, match="not for the linked hub 'b.example.net'"):
        HubConnection.parse(
            f"HostName=a.example.net;SharedAccessKeyName=p;SharedAccessKey={KEY}", host="b.example.net"
        )


def test_ca_certificate_must_be_pem() -> None:
    text = pem(root_ca())
    assert parse_ca_certificate(text) == text
    for bad in ("", "hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(InvalidBodyError, match="caCertificate"):
            parse_ca_certificate(bad)


def test_iot_hub_errors_as_the_hub_gives_them() -> None:
    body = {
        "Message": "ErrorCode:IotHubUnauthorizedAccess;Unauthorized",
        "ExceptionMessage": "Tracking ID:abc123-G:5-TimeStamp:12/04/2026 21:00:00",
    }
    assert (
        hub_error_text(httpx.Response(401, json=body))
        == "401 IotHubUnauthorizedAccess: Unauthorized (tracking id abc123-G:5)"
    )
    headed = httpx.Response(
        403, json={"Message": "no rights"}, headers={"iothub-errorcode": "IotHubUnauthorized"}
    )
    assert hub_error_text(headed) == "403 IotHubUnauthorized: no rights"
    assert hub_error_text(httpx.Response(502, text="bad gateway")) == "502 Bad Gateway: bad gateway"


def test_write_budget_from_tier_or_given() -> None:
    hub = LinkedHub(host_name="h")
    assert hub.registry_write_budget() is None
    assert LinkedHub(host_name="h", tier=HubTier.S1).registry_write_budget() == pytest.approx(100 / 60)
    assert LinkedHub(host_name="h", tier=HubTier.S3, units=2).registry_write_budget() == pytest.approx(
        10_000 / 60
    )
    assert LinkedHub(host_name="h", tier=HubTier.S1, write_budget_per_second=7).registry_write_budget() == 7
