"""Where the server may listen: with no API keys, loopback only."""

from app.auth import safe_host


def test_without_keys_a_public_address_becomes_loopback_and_says_so():
    host, warning = safe_host("0.0.0.0", {})
    assert host == "127.0.0.1" and "refusing to listen on 0.0.0.0" in warning


def test_without_keys_loopback_is_kept_with_a_note():
    host, warning = safe_host("127.0.0.1", {})
    assert host == "127.0.0.1" and "loopback only" in warning


def test_with_keys_any_address_is_allowed():
    assert safe_host("0.0.0.0", {"k": ["admin"]}) == ("0.0.0.0", None)
