"""Job lines: parsing, validation against caps, splitting into renders, and pricing. Pure."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from pipeline.caps import Caps

BATCH_URLS = ("/v1/images/generations", "/images/generations")
# Keys of a job line that belong to the pipeline, not to the request body.
LINE_KEYS = ("custom_id", "metadata")
MAX_N = 10_000
SEED_SPACE = 2**32
# The largest integer SQL stores (SQLite INTEGER, PostgreSQL BIGINT): seeds, and every seed
# derived from them (image i of a render seeded s is s + i), must fit.
INT64_MAX = 2**63 - 1
# The largest cap (a job's, a team's period budget) in cents: $1,000,000,000,000.00. Far
# below INT64_MAX, so spent + reserved + a render's price, and sums of many budgets in
# reports, cannot overflow a 64-bit integer.
MAX_CENTS = 10**14
# Deeper JSON is refused: the parser and the encoder recurse, and a body must load and
# encode again in any process (a worker's stack is deeper than the CLI's).
MAX_DEPTH = 64
# Column sizes (pipeline/models.py): PostgreSQL refuses longer values, and refused values
# must be refused per line, not by the database at the end of a chunk.
MAX_CUSTOM_ID = 500
MAX_MODEL = 200


@dataclass(frozen=True)
class JobLine:
    """One request of a job: its line number, optional custom_id and metadata, and the body."""

    line: int
    body: dict[str, Any]
    custom_id: str | None = None
    metadata: Any = None

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str
    custom_id: str | None = None
    raw: str = ""

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class RenderSpec:
    """One upstream call of an item: n images, made with this seed (None: unseeded)."""

    index: int
    n: int
    seed: int | None


@dataclass(frozen=True)
class PlannedItem:
    line: JobLine
    renders: tuple[RenderSpec, ...]
    price_per_image_cents: int

    @property
    def max_cost_cents(self) -> int:
        return self.price_per_image_cents * self.line.n


@dataclass
class ModelSummary:
    model: str
    items: int = 0
    images: int = 0
    calls: int = 0
    max_cost_cents: int = 0


@dataclass(frozen=True)
class Plan:
    items: tuple[PlannedItem, ...]
    errors: tuple[LineError, ...]
    by_model: dict[str, ModelSummary] = field(default_factory=dict)

    @property
    def max_cost_cents(self) -> int:
        return sum(m.max_cost_cents for m in self.by_model.values())

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.by_model.values())

    @property
    def images(self) -> int:
        return sum(m.images for m in self.by_model.values())


# --- parsing -------------------------------------------------------------------------------


def parse_lines(text: str) -> list[JobLine | LineError]:
    """Every non-blank line of a JSONL job file, parsed, with duplicate custom_ids caught."""
    parsed: list[JobLine | LineError] = []
    # Split on LF only: str.splitlines would also split on U+2028 inside a JSON string.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if raw.strip():
            parsed.append(parse_line(number, raw))
    return reject_duplicate_ids(parsed)


def parse_line(number: int, raw: str) -> JobLine | LineError:
    try:
        value = load_json(raw)
    except BadJSON as exc:
        return LineError(number, str(exc), raw=raw)
    if not isinstance(value, dict):
        return LineError(number, "a line must be a JSON object", raw=raw)
    return line_from_object(number, value, raw)


class BadJSON(ValueError):
    """JSON text that cannot be a request: the one-line reason."""


def _not_finite(literal: str) -> float:
    raise BadJSON(f"{shown(literal, quote=False)} is not a number a request can carry (JSON "
                  "has no NaN or Infinity)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise BadJSON(f"{shown(literal, quote=False)} is too large a number (it would be "
                      "sent as Infinity, which JSON has not)")
    return value


# One decoder, built once (json.loads with hooks builds one per call).
_decoder = json.JSONDecoder(parse_constant=_not_finite, parse_float=_finite_float)
# A \uD800-\uDFFF escape: the text may hold a lone surrogate once decoded (a paired one
# decodes to one character and is fine).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(text: str) -> Any:
    """JSON text as a value that can be stored and sent as UTF-8 JSON, or BadJSON: not
    JSON, NaN or Infinity (or a number that overflows to it), nested deeper than MAX_DEPTH,
    an integer of more digits than Python reads, or a string holding a lone surrogate."""
    try:
        value = _decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise BadJSON(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise BadJSON(f"not valid JSON: nested deeper than {MAX_DEPTH} levels") from None
    except BadJSON:
        raise
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise BadJSON("holds an integer too long to read (more than 4300 digits)") from None
    problem = value_problem(value, strings=_SURROGATE_ESCAPE.search(text) is not None)
    if problem is not None:
        raise BadJSON(problem)
    return value


def value_problem(value: Any, *, strings: bool = True) -> str | None:
    """Why a decoded JSON value cannot be a request: nested deeper than MAX_DEPTH, or (when
    `strings`) a string or key holding a lone surrogate, which UTF-8 cannot encode, so it
    could be neither stored nor sent. Iterative: a deep value cannot exhaust the stack."""
    if not isinstance(value, dict | list):
        if strings and isinstance(value, str) and _lone_surrogate(value):
            return _surrogate_reason(value, None)
        return None
    stack: list[tuple[Any, int, str | None]] = [(value, 1, None)]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels" + (f" (in {where})" if where
                                                                 else "")
        pairs = item.items() if isinstance(item, dict) else ((None, v) for v in item)
        for key, child in pairs:
            if strings and isinstance(key, str) and _lone_surrogate(key):
                return _surrogate_reason(key, f"a key of {where}" if where else "a key")
            here = where if where is not None else key
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, here))
            elif strings and isinstance(child, str) and _lone_surrogate(child):
                return _surrogate_reason(child, here)
    return None


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_reason(text: str, where: str | None) -> str:
    char = next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF)
    field = shown(where, quote=False) if where else "a string"
    return (f"{field} holds a lone surrogate (\\u{ord(char):04x}), which cannot be stored or "
            "sent as UTF-8")


def shown(value: Any, *, quote: bool = True, limit: int = 60) -> str:
    """A user's value in a one-line message: repr (or as is), cut to `limit` characters."""
    text = repr(value) if quote else str(value)
    if len(text) > limit:
        text = f"{text[:limit - 20]}... ({len(text):,} characters)"
    return text


def line_from_object(number: int, value: dict[str, Any], raw: str = "") -> JobLine | LineError:
    custom_id = value.get("custom_id")
    if custom_id is not None and (isinstance(custom_id, bool)
                                  or not isinstance(custom_id, str | int)):
        return LineError(number, "custom_id must be a string", raw=raw)
    custom_id = None if custom_id is None else str(custom_id)
    if custom_id is not None:
        reason = column_problem("custom_id", custom_id, MAX_CUSTOM_ID)
        if reason is not None:  # kept off the item too: it is what could not be stored
            return LineError(number, reason, raw=raw)
    if "body" in value and ("url" in value or "method" in value):
        return _batch_line(number, value, custom_id, raw)
    body = {k: v for k, v in value.items() if k not in LINE_KEYS}
    return check_body(JobLine(number, body, custom_id, value.get("metadata")), raw)


def _batch_line(
    number: int, value: dict[str, Any], custom_id: str | None, raw: str
) -> JobLine | LineError:
    method = str(value.get("method", "POST")).upper()
    url = str(value.get("url", BATCH_URLS[0]))
    if method != "POST":
        return LineError(number, f"method {shown(method)} is not supported (POST only)",
                         custom_id, raw)
    if not url.rstrip("/").endswith(BATCH_URLS[1]):
        return LineError(number, f"url {shown(url)} is not /v1/images/generations",
                         custom_id, raw)
    body = value.get("body")
    if not isinstance(body, dict):
        return LineError(number, "body must be a JSON object", custom_id, raw)
    return check_body(JobLine(number, dict(body), custom_id, value.get("metadata")), raw)


def check_body(line: JobLine, raw: str = "") -> JobLine | LineError:
    """The checks that need no caps: required fields and the types the pipeline relies on."""
    body = line.body

    def error(reason: str) -> LineError:
        return LineError(line.line, reason, line.custom_id, raw)

    if not isinstance(body.get("model"), str) or not body["model"].strip():
        return error("missing model")
    reason = column_problem("model", body["model"], MAX_MODEL)
    if reason is not None:
        return error(reason)
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return error("missing prompt")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        return error(f"n must be an integer from 1 to {MAX_N}, got {shown(n)}")
    reason = seed_problem(body.get("seed"), n)
    if reason is not None:
        return error(reason)
    fmt = body.get("response_format")
    if fmt is not None and fmt not in ("url", "b64_json"):
        return error(f"response_format must be 'url' or 'b64_json', got {shown(fmt)}")
    return line


def seed_problem(seed: Any, n: int) -> str | None:
    """Why `seed` cannot seed n images, or None. Image i of the item is made with seed + i
    (split_into_renders), stored as a 64-bit integer: so seed + n - 1 must fit."""
    if seed is None:
        return None
    top = INT64_MAX - (n - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
        why = "" if n == 1 else f" with n {n} (image i gets seed + i, a 64-bit integer)"
        return f"seed must be an integer from 0 to {top}{why}, got {shown(seed)}"
    return None


def column_problem(name: str, value: str, longest: int) -> str | None:
    """Why a string cannot go in its own column, or None: too long for it, or holding a NUL
    character (PostgreSQL text cannot) or a lone surrogate (UTF-8 cannot)."""
    if len(value) > longest:
        return f"{name} is {len(value):,} characters long, more than {longest}"
    if "\x00" in value:
        return f"{name} holds a NUL character (\\u0000), which cannot be stored"
    if _lone_surrogate(value):
        return _surrogate_reason(value, name)
    return None


def reject_duplicate_ids(lines: Iterable[JobLine | LineError]) -> list[JobLine | LineError]:
    first_seen: dict[str, int] = {}
    out: list[JobLine | LineError] = []
    for entry in lines:
        cid = entry.custom_id
        if cid is not None and cid in first_seen:
            entry = repeated_id(entry, first_seen[cid])
        elif cid is not None:
            first_seen[cid] = entry.line
        out.append(entry)
    return out


def repeated_id(entry: JobLine | LineError, first_line: int) -> LineError:
    """The error of a line whose custom_id an earlier line (first_line) already has."""
    return LineError(
        entry.line, f"custom_id {shown(entry.custom_id)} repeats line {first_line}",
        entry.custom_id,
        entry.raw if isinstance(entry, LineError) else "",
    )


# --- validation against caps ---------------------------------------------------------------


def check_caps(line: JobLine, caps: Mapping[str, Caps]) -> str | None:
    """Why this line cannot run on its model, or None when it can."""
    model = caps.get(line.model)
    if model is None:
        return f"unknown model {shown(line.model)} (not an image model in /models)"
    if model.refused is not None:  # a price or max_n in /models that cannot be meant
        return model.refused
    if model.price_per_image_cents is None:
        return f"model {shown(line.model)} has no known price: it cannot run under a budget"
    body = line.body
    for key, allowed in (
        ("size", model.sizes),
        ("aspect_ratio", model.aspect_ratios),
        ("quality", model.qualities),
    ):
        if key in body and allowed is not None and body[key] not in allowed:
            listed = ", ".join(allowed)
            return (f"{key} {shown(body[key])} is not allowed for {line.model} "
                    f"(allowed: {listed})")
    count = count_input_images(body)
    if isinstance(count, str):
        return count
    if model.max_input_images is not None and count > model.max_input_images:
        return (
            f"{count} input images (input_images + image_urls) but {line.model} takes at most "
            f"{model.max_input_images}"
        )
    return None


def count_input_images(body: Mapping[str, Any]) -> int | str:
    total = 0
    for key in ("input_images", "image_urls"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            return f"{key} must be a list"
        total += len(value)
    return total


# --- splitting and pricing -----------------------------------------------------------------


def split_into_renders(n: int, max_n: int | None, seed: int | None) -> tuple[RenderSpec, ...]:
    """n images as calls of at most max_n each.

    Seed rule: render k is sent with `seed + (images in renders before k)`, wrapped into
    [0, 2**32) when the seed started there. Upstreams make image i of a call with seed s from
    s + i, so no two images of the item share a seed and no call repeats another's images.
    """
    per_call = max(1, max_n) if max_n else n
    renders: list[RenderSpec] = []
    done = 0
    for index in range(math.ceil(n / per_call)):
        count = min(per_call, n - done)
        renders.append(RenderSpec(index, count, derive_seed(seed, done)))
        done += count
    return tuple(renders)


def derive_seed(seed: int | None, offset: int) -> int | None:
    if seed is None:
        return None
    derived = seed + offset
    if seed < SEED_SPACE:
        derived %= SEED_SPACE
    return derived


def plan_lines(entries: Iterable[JobLine | LineError], caps: Mapping[str, Caps]) -> Plan:
    """Validate every line against caps, split the valid ones into renders and price them."""
    items: list[PlannedItem] = []
    errors: list[LineError] = []
    summary: dict[str, ModelSummary] = {}
    for entry in entries:
        planned = plan_line(entry, caps)
        if isinstance(planned, LineError):
            errors.append(planned)
            continue
        items.append(planned)
        add_to_summary(summary, planned)
    return Plan(tuple(items), tuple(errors), summary)


def plan_line(entry: JobLine | LineError, caps: Mapping[str, Caps]) -> PlannedItem | LineError:
    """One line validated against caps, split into renders and priced (or why it cannot)."""
    if isinstance(entry, LineError):
        return entry
    reason = check_caps(entry, caps)
    if reason is not None:
        return LineError(entry.line, reason, entry.custom_id)
    model = caps[entry.model]
    renders = split_into_renders(entry.n, model.max_n, entry.body.get("seed"))
    return PlannedItem(entry, renders, int(model.price_per_image_cents or 0))


def add_to_summary(summary: dict[str, ModelSummary], item: PlannedItem) -> None:
    model = item.line.model
    entry = summary.get(model)
    if entry is None:
        entry = summary[model] = ModelSummary(model)
    entry.items += 1
    entry.images += item.line.n
    entry.calls += len(item.renders)
    entry.max_cost_cents += item.max_cost_cents


def render_request(body: Mapping[str, Any], spec: RenderSpec) -> dict[str, Any]:
    """The body sent for one render: every key passed through, n and seed set for this call."""
    request = dict(body)
    request["n"] = spec.n
    if spec.seed is not None:
        request["seed"] = spec.seed
    return request


def parse_dollars(text: str) -> int:
    """'5.00' -> 500 cents, exactly (no float on the way). ValueError, with a one-line
    reason, for anything else: not a number, NaN, sNaN, Infinity, negative, a fraction of a
    cent, or more than MAX_CENTS (1e309 included: a Decimal holds it, SQL does not)."""
    return _cents(text.strip().removeprefix("$").replace(",", ""), text, places=2,
                  what="an amount in dollars (e.g. 5.00)")


def parse_cents(text: str) -> int:
    """'500' -> 500: a whole number of cents from 0 to MAX_CENTS, or ValueError."""
    return _cents(text.strip(), text, places=0, what="a whole number of cents")


# Stands for the option's name in a reason (argv can hold no NUL, so no value holds this):
# the command line puts its own name in its place.
OPTION = "\x00option\x00"


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """A check of a whole number from `low` to `high` (a job id of 10**20 reached SQL as an
    OverflowError), raising ValueError with the reason."""
    def check(text: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise ValueError(f"{shown(text)} is not a whole number from {low:,} to {high:,}")
        return number
    return check


def stored_text(longest: int) -> Callable[[str], str]:
    """A check of text that fits its column of `longest` characters and that SQL can store
    (no NUL, no bytes that are not UTF-8, which reach Python as lone surrogates)."""
    def check(text: str) -> str:
        problem = column_problem(OPTION, text, longest)
        if problem is not None:
            raise ValueError(problem.replace("holds a lone surrogate", "holds bytes that are "
                                             "not UTF-8 text, read as a lone surrogate"))
        return text
    return check


def _cents(number: str, text: str, *, places: int, what: str) -> int:
    """`number` (units of 10**places cents) as whole cents, without Decimal arithmetic: it
    rounds to its context, so 1e999999999 * 100 overflows and 1e-999999999 * 100 becomes 0."""
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"{shown(text)} is not {what}") from None
    if not value.is_finite():  # compared, sNaN would raise
        raise ValueError(f"{shown(text)} is not {what}")
    if value < 0:
        raise ValueError(f"{shown(text)} is negative")
    if value > Decimal(MAX_CENTS).scaleb(-places):  # comparisons are exact
        raise ValueError(f"{shown(text)} is more than the largest cap, "
                         f"{format_dollars(MAX_CENTS)}")
    _, digits, exponent = value.as_tuple()
    significant = "".join(map(str, digits)).rstrip("0")
    if not significant:
        return 0
    shift = int(exponent) + places + (len(digits) - len(significant))
    if shift < 0:
        raise ValueError(f"{shown(text)} is not a whole number of cents")
    return int(significant) * 10**shift


def format_dollars(cents: int) -> str:
    """500 -> '$5.00' (negative amounts keep their sign)."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}${whole:,}.{part:02d}"
