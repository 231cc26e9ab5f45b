"""Secrets stay out of what we keep and print: the URL and secret redactors that every
message, log line and stored string goes through (the CLI end to end:
tests/acceptance/test_redaction.py)."""

from __future__ import annotations

import pytest

from pipeline.redact import Redactor, redact_url, redactor_for


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:PASSWORD@host/v1", "http://user:***@host/v1"),
    ("https://TOKEN@host:8443/v1", "https://***@host:8443/v1"),
    ("https://host/v1?key=SECRET#frag", "https://host/v1?…"),
    ("https://api.airforce/v1", "https://api.airforce/v1"),
    ("not a url", "not a url"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_redactor_takes_every_form_of_a_secret() -> None:
    redact = redactor_for("http://u:p%40ss-word@host/v1", "sk-air-abcdef")
    text = redact("sk-air-abcdef p@ss-word p%40ss-word dTpwQHNzLXdvcmQ= http://a:b@h/x")
    assert text == "[redacted] [redacted] [redacted] [redacted] http://***@h/x"
    assert Redactor("ab")("ab cab") == "ab cab"  # too short to be a secret: prompts intact


def test_a_secret_that_holds_another_is_replaced_whole() -> None:
    redact = Redactor("sk-air-abc", "sk-air-abcdef")
    assert redact("key sk-air-abcdef and sk-air-abc") == "key [redacted] and [redacted]"


def test_a_key_echoed_percent_encoded_inside_a_url_is_redacted() -> None:
    redact = redactor_for("https://api.example/v1", "sk-air/k+y=1")
    assert redact("GET https://cdn.example/x?k=sk-air%2Fk%2By%3D1 failed") == (
        "GET https://cdn.example/x?k=[redacted] failed")


def test_a_bare_token_in_the_api_base_is_a_secret_and_so_is_its_basic_credential() -> None:
    redact = redactor_for("https://tok-123456@proxy.example/v1", None)
    assert redact("401 for tok-123456 (Basic dG9rLTEyMzQ1Njo=)") == (
        "401 for [redacted] (Basic [redacted])")


def test_credentials_of_any_url_in_a_message_are_masked_even_unknown_ones() -> None:
    redact = redactor_for("https://api.example/v1", None)
    assert redact("redirect to s3://AKIA:wJalr@bucket/k and ftp://x@h") == (
        "redirect to s3://***@bucket/k and ftp://***@h")


@pytest.mark.parametrize("text", [
    "https://host/users/@me",
    "mail me at someone@example.com",
    "a prompt with an otter",
])
def test_text_without_credentials_is_left_as_it_is(text: str) -> None:
    assert redactor_for("https://u:secret-pw@api.example/v1", "sk-air-abcdef")(text) == text
