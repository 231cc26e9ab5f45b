"""The per-request `fake` object: how one call should misbehave (see docs/CONTRACTS.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fake_upstream.errors import invalid
from fake_upstream.media_bytes import KINDS

LINE_ENDS = {"lf": "\n", "cr": "\r", "crlf": "\r\n"}
MEDIA_KINDS = tuple(kind for kind in KINDS if kind != "garbage")
MAX_MEDIA_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Knobs:
    status: int | None = None
    retry_after: float | None = None
    fail_first: int | None = None
    key: str | None = None
    error_event: bool = False
    cut: bool = False
    stall: bool = False
    garbage: bool = False
    line_end: str = "lf"
    chunk: int | None = None
    event_lines: bool = False
    empty_events: int = 0
    revised_prompt: str | None = None
    media: str | None = None
    media_bytes: int | None = None
    latency: float | None = None
    redirect: str | None = None
    echo_key: bool = False
    bad_b64: bool = False

    @property
    def eol(self) -> str:
        return LINE_ENDS[self.line_end]

    @property
    def picks_outcome(self) -> bool:
        """True when the request says how it ends, so the global random rates leave it alone."""
        return (self.status is not None or self.fail_first is not None or self.error_event
                or self.cut or self.stall or self.garbage)


# knob -> (accepted types, check on the value, what the error says it must be)
_RULES: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "status": ((int,), lambda v: 400 <= v <= 599, "an HTTP error status (400-599)"),
    "retry_after": ((int, float), lambda v: 0 <= v <= 3600, "seconds (0-3600)"),
    "fail_first": ((int,), lambda v: v >= 0, "a count >= 0"),
    "key": ((str,), None, "a string"),
    "error_event": ((bool,), None, "a boolean"),
    "cut": ((bool,), None, "a boolean"),
    "stall": ((bool,), None, "a boolean"),
    "garbage": ((bool,), None, "a boolean"),
    "line_end": ((str,), lambda v: v in LINE_ENDS, "one of lf, cr, crlf"),
    "chunk": ((int,), lambda v: v >= 1, "a byte count >= 1"),
    "event_lines": ((bool,), None, "a boolean"),
    "empty_events": ((int,), lambda v: 0 <= v <= 100_000, "a count (0-100000)"),
    "revised_prompt": ((str,), None, "a string"),
    "media": ((str,), lambda v: v in MEDIA_KINDS, "one of " + ", ".join(MEDIA_KINDS)),
    "media_bytes": ((int,), lambda v: 0 <= v <= MAX_MEDIA_BYTES, "a byte count"),
    "latency": ((int, float), lambda v: 0 <= v <= 3600, "seconds (0-3600)"),
    "redirect": ((str,), None, "a URL string"),
    "echo_key": ((bool,), None, "a boolean"),
    "bad_b64": ((bool,), None, "a boolean"),
}


def parse_knobs(raw: object) -> Knobs:
    """Knobs from the body's "fake" value; unknown names and bad values are 400s, so a typo
    in a test's job line fails loudly instead of silently doing nothing."""
    if raw is None:
        return Knobs()
    if not isinstance(raw, dict):
        raise invalid("fake must be an object", "fake")
    for name, value in raw.items():
        _check_knob(name, value)
    return Knobs(**{f.name: raw[f.name] for f in fields(Knobs) if f.name in raw})


def _check_knob(name: str, value: object) -> None:
    rule = _RULES.get(name)
    if rule is None:
        raise invalid(f"unknown fake knob {name!r}", f"fake.{name}")
    types, check, wanted = rule
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types) or (check is not None and not check(value)):
        raise invalid(f"fake.{name} must be {wanted}", f"fake.{name}")
