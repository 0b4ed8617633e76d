"""protocol/sas.py: SAS tokens parsed, signed and verified as the official SDKs make them."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisiond.errors import AuthenticationError
from provisiond.protocol.sas import (
    build_sas_token,
    derive_device_key,
    parse_sas_token,
    percent_decoded,
    verify_signature,
)

KEY = derive_device_key("MpSOpkdWeJ/XVXo7PtbUhyii2HsmLtZyRsR8Hz/3gPM=", "dev-1")


def test_a_token_parses_to_what_it_was_built_from_and_verifies_with_its_key() -> None:
    token = build_sas_token("0ne00000001/registrations/dev-1", KEY, 1_900_000_000, key_name="registration")
    parsed = parse_sas_token(token)
    assert parsed.resource == "0ne00000001/registrations/dev-1"
    assert parsed.raw_resource == "0ne00000001%2Fregistrations%2Fdev-1"
    assert parsed.expiry == 1_900_000_000 and parsed.key_name == "registration"
    assert verify_signature(parsed, KEY)
    assert not verify_signature(
        parsed, derive_device_key("MpSOpkdWeJ/XVXo7PtbUhyii2HsmLtZyRsR8Hz/3gPM=", "dev-2")
    )


@pytest.mark.parametrize(
    ("skn", "expected"),
    [("registration", "registration"), ("a+b", "a b"), ("a%20b", "a b"), ("%zz", "%zz"), ("", None)],
)
def test_the_key_name_is_decoded_as_a_query_parser_reads_it(skn: str, expected: str | None) -> None:
    parsed = parse_sas_token(f"SharedAccessSignature sr=s%2Fregistrations%2Fd&sig=abc&se=1&skn={skn}")
    assert parsed.key_name == expected


def test_malformed_tokens_are_refused_with_the_reason() -> None:
    with pytest.raises(AuthenticationError, match="lacks sig"):
        parse_sas_token("SharedAccessSignature sr=a&se=1")
    with pytest.raises(AuthenticationError, match="expiry"):
        parse_sas_token("SharedAccessSignature sr=a&sig=b&se=soon")
    with pytest.raises(AuthenticationError, match="malformed field"):
        parse_sas_token("SharedAccessSignature sr=a&sig=b&se=1&junk")
    with pytest.raises(AuthenticationError, match="too long"):
        parse_sas_token("SharedAccessSignature sr=" + "a" * 5000 + "&sig=b&se=1")
    with pytest.raises(AuthenticationError, match="not a SharedAccessSignature"):
        parse_sas_token("Bearer abc")


def test_derived_device_keys_are_the_hmac_of_the_registration_id() -> None:
    """Each derivation is HMAC-SHA256(base64decode(group key), registration id), also when the
    group's keyed HMAC is reused for the next device (a copy: the first device's bytes must not
    leak into the second's key)."""
    import base64
    import hmac

    group = "MpSOpkdWeJ/XVXo7PtbUhyii2HsmLtZyRsR8Hz/3gPM="
    for reg in ("dev-1", "dev-2", "dev-1", "déjà-vu"):
        expected = hmac.digest(base64.b64decode(group), reg.encode("utf-8"), "sha256")
        assert derive_device_key(group, reg) == base64.b64encode(expected).decode("ascii")


def test_a_token_parsed_again_reads_the_same_and_a_malformed_one_is_refused_every_time() -> None:
    """Parsed tokens are remembered (a device's token is parsed at CONNECT or SASL and again at
    register time); a malformed token is not: it is refused each time it comes."""
    token = build_sas_token("scope/registrations/dev-1", KEY, 2_000_000_000, key_name="registration")
    assert parse_sas_token(token) == parse_sas_token(token)
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            parse_sas_token("SharedAccessSignature sr=x&se=1")


#: Text made of pieces of percent-encoding: escapes of ASCII, of UTF-8 sequences whole and
#: broken, escapes cut short or not hexadecimal, and characters outside ASCII.
_ESCAPED = st.lists(
    st.sampled_from(
        [
            "%",
            "%2",
            "%2F",
            "%2f",
            "%3D",
            "%zz",
            "%C3",
            "%A9",
            "%C3%A9",
            "%E2%82",
            "%80",
            "a",
            "+",
            "/",
            "=",
            "é",
            "\x80",
        ]
    ),
    max_size=12,
).map("".join)


@given(st.one_of(_ESCAPED, st.text(max_size=40)))
def test_percent_decoding_is_unquotes_for_any_text(text: str) -> None:
    assert percent_decoded(text) == unquote(text)
