"""Secrets out of what we keep: the API key and the API base's credentials never reach SQL,
logs, errors or exports, even when an upstream echoes them back (in a revised prompt, an
error message, an HTTP error body)."""

from __future__ import annotations

import base64
import re
from urllib.parse import quote, unquote

REDACTED = "[redacted]"
# Shorter secrets are not searched for in text: a 1-3 character "key" would blank out
# ordinary words of every prompt, and is no secret worth the name.
MIN_SECRET = 4
# scheme://userinfo@ anywhere in a text (the userinfo holds no '/', '@' or blank).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#@\s\"'<>]+)@")
_QUERY = re.compile(r"[?#].*$", re.DOTALL)


def redact_url(url: str) -> str:
    """A URL fit to print and store: `user:***@` (or `***@` for a bare token) instead of its
    credentials, and `?…` instead of its query (where keys also travel)."""
    def mask(match: re.Match[str]) -> str:
        user, has_password, _ = match[2].partition(":")
        return f"{match[1]}{user}:***@" if has_password else f"{match[1]}***@"

    text = _USERINFO.sub(mask, url)
    scheme_end = text.find("://")
    if scheme_end >= 0:
        text = text[:scheme_end + 3] + _QUERY.sub("?…", text[scheme_end + 3:])
    return text


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials in a URL's userinfo: the password, or the user when there is none (a
    bare `https://TOKEN@host`), as written and percent-decoded; and the Basic credential
    they are sent as (base64 of user:password), which a server may echo back."""
    match = _USERINFO.search(url)
    if match is None:
        return ()
    user, has_password, password = match[2].partition(":")
    secret = password if has_password else user
    basic = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return tuple({secret, unquote(secret), basic})


class Redactor:
    """Takes the given secrets (and every URL's credentials) out of a text."""

    def __init__(self, *secrets: str | None) -> None:
        found: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET:
                # As sent, and as a server may echo it inside a URL or a JSON string.
                found.update({secret, quote(secret, safe=""), unquote(secret)})
        # Longest first: a secret that holds another is replaced whole.
        self._secrets = sorted((s for s in found if len(s) >= MIN_SECRET), key=len,
                               reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _USERINFO.sub(lambda m: f"{m[1]}***@", text)


def redactor_for(api_base: str, api_key: str | None) -> Redactor:
    """The redactor of one upstream: its key and its base's credentials."""
    return Redactor(api_key, *url_secrets(api_base))
