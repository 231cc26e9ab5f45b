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
