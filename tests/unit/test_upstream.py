"""The upstream client's rules that need no HTTP: base64 decoding and its cap, which addresses
media may come from, Retry-After (the client over real HTTP:
tests/integration/test_upstream.py)."""

from __future__ import annotations

import base64
import ipaddress
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from pipeline.upstream import (
    MediaRefused,
    address_problem,
    decode_b64,
    parse_retry_after,
)
from tests.integration.test_upstream import PNG, fetch


def test_decode_b64_plain_and_data_url() -> None:
    raw = PNG + bytes(range(256))
    encoded = base64.b64encode(raw).decode()
    assert decode_b64(encoded, 1024) == raw
    assert decode_b64("data:image/png;base64," + encoded, 1024) == raw


@pytest.mark.parametrize("value", ["not base64!", "QUJD\nREVG", "QUJ", "", "data:image/png,QUJD"])
def test_decode_b64_strict(value: str) -> None:
    with pytest.raises(MediaRefused):
        decode_b64(value, 1024)


def test_decode_b64_cap_checked_before_decoding() -> None:
    # Invalid characters: were it decoded first, the error would be about validity.
    with pytest.raises(MediaRefused, match="cap"):
        decode_b64("!" * 4000, 1000)
    ok = base64.b64encode(b"x" * 1000).decode()
    assert len(decode_b64(ok, 1000)) == 1000
    with pytest.raises(MediaRefused, match="cap"):
        decode_b64(ok, 999)


@pytest.mark.parametrize(("address", "private_ok", "refused"), [
    ("169.254.169.254", True, "metadata"),
    ("fd00:ec2::254", True, "metadata"),
    ("100.100.100.200", True, "metadata"),
    ("169.254.1.1", True, "link-local"),
    ("fe80::1", True, "link-local"),
    ("::ffff:169.254.169.254", True, "metadata"),
    ("64:ff9b::a9fe:a9fe", True, "metadata"),
    ("224.0.0.1", True, "multicast"),
    ("ff02::1", True, "multicast"),
    ("0.0.0.0", True, "unspecified"),
    ("::", True, "unspecified"),
    ("127.0.0.1", False, "private"),
    ("10.1.2.3", False, "private"),
    ("192.168.0.1", False, "private"),
    ("::1", False, "private"),
    ("fd12::1", False, "private"),
    ("::ffff:127.0.0.1", False, "private"),
    ("127.0.0.1", True, None),
    ("10.1.2.3", True, None),
    ("fd12::1", True, None),
    ("8.8.8.8", False, None),
    ("2606:4700::1111", False, None),
])
def test_address_rules(address: str, private_ok: bool, refused: str | None) -> None:
    problem = address_problem(ipaddress.ip_address(address), private_ok=private_ok)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused in problem


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (parse_retry_after(later) or 0) <= 121
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert parse_retry_after(earlier) == 0.0


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://100.100.100.200/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "file:///etc/passwd",
    "ftp://example.com/x.png",
    "not a url",
])
def test_forbidden_targets_refused_even_with_private_allowed(url: str) -> None:
    with pytest.raises(MediaRefused):
        fetch("http://127.0.0.1:9/v1", url, allow_private_media=True)
