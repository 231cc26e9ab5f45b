"""Job lines: parsing, validation against caps, splitting into renders, and pricing. Pure."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.caps import Caps

BATCH_URLS = ("/v1/images/generations", "/images/generations")
# Keys of a job line that belong to the pipeline, not to the request body.
LINE_KEYS = ("custom_id", "metadata")
MAX_N = 10_000
SEED_SPACE = 2**32


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
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return LineError(number, f"not valid JSON ({exc.msg} at column {exc.colno})", raw=raw)
    if not isinstance(value, dict):
        return LineError(number, "a line must be a JSON object", raw=raw)
    return line_from_object(number, value, raw)


def line_from_object(number: int, value: dict[str, Any], raw: str = "") -> JobLine | LineError:
    custom_id = value.get("custom_id")
    if custom_id is not None and not isinstance(custom_id, str | int):
        return LineError(number, "custom_id must be a string", raw=raw)
    custom_id = None if custom_id is None else str(custom_id)
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
        return LineError(number, f"method {method!r} is not supported (POST only)", custom_id, raw)
    if not url.rstrip("/").endswith(BATCH_URLS[1]):
        return LineError(number, f"url {url!r} is not /v1/images/generations", custom_id, raw)
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
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return error("missing prompt")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        return error(f"n must be an integer from 1 to {MAX_N}, got {n!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        return error(f"seed must be a non-negative integer, got {seed!r}")
    fmt = body.get("response_format")
    if fmt is not None and fmt not in ("url", "b64_json"):
        return error(f"response_format must be 'url' or 'b64_json', got {fmt!r}")
    return line


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
        entry.line, f"custom_id {entry.custom_id!r} repeats line {first_line}", entry.custom_id,
        entry.raw if isinstance(entry, LineError) else "",
    )


# --- validation against caps ---------------------------------------------------------------


def check_caps(line: JobLine, caps: Mapping[str, Caps]) -> str | None:
    """Why this line cannot run on its model, or None when it can."""
    model = caps.get(line.model)
    if model is None:
        return f"unknown model {line.model!r} (not an image model in /models)"
    if model.price_per_image_cents is None:
        return f"model {line.model!r} has no known price: it cannot run under a budget"
    body = line.body
    for key, allowed in (
        ("size", model.sizes),
        ("aspect_ratio", model.aspect_ratios),
        ("quality", model.qualities),
    ):
        if key in body and allowed is not None and body[key] not in allowed:
            listed = ", ".join(allowed)
            return f"{key} {body[key]!r} is not allowed for {line.model} (allowed: {listed})"
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
    """'5.00' -> 500 cents, exactly (no float on the way)."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"{text!r} is not an amount in dollars") from None
    cents = value * 100
    if cents != cents.to_integral_value() or cents < 0:
        raise ValueError(f"{text!r} is not a whole number of cents")
    return int(cents)
