"""The fake provider's models, and validation of a generation request against their caps."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from fake_upstream.errors import FakeError, invalid

_FLUX_RATIOS = ["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]
_CREATED = 1_715_000_000


def _model(model_id: str, modalities: list[str], caps: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": model_id, "object": "model", "created": _CREATED, "owned_by": "fake-upstream",
        "output_modalities": modalities,
    }
    if caps is not None:
        entry["image_caps"] = caps
    return entry


MODELS: list[dict[str, Any]] = [
    _model("flux-2-dev", ["image"], {
        "max_n": 4, "aspect_ratios": _FLUX_RATIOS, "max_input_images": 4,
        "price_per_image_cents": 3}),
    _model("flux-2-klein-4b", ["image"], {
        "max_n": 4, "aspect_ratios": _FLUX_RATIOS, "max_input_images": 4,
        "price_per_image_cents": 1}),
    _model("nano-banana-pro", ["image"], {
        "max_n": 2, "aspect_ratios": ["1:1", "16:9", "9:16", "4:3"], "max_input_images": 8,
        "price_per_image_cents": 12}),
    _model("gpt-image-1", ["image"], {
        "max_n": 10, "sizes": ["1024x1024", "1024x1536", "1536x1024"],
        "qualities": ["standard", "hd"], "max_input_images": 0, "price_per_image_cents": 4}),
    _model("wan-2.2", ["image", "video"], {
        "max_n": 1, "aspect_ratios": ["16:9", "9:16", "1:1"], "max_input_images": 1,
        "price_per_image_cents": 25}),
    _model("suno-v5", ["audio"], {
        "max_n": 2, "max_input_images": 0, "price_per_image_cents": 5}),
    _model("preview-model", ["image"], {"max_n": 1}),  # no price: cannot run under a budget
    _model("gpt-4o-mini", ["text"], None),
]

# What a model returns when the request does not ask for a media type (fake.media).
DEFAULT_MEDIA = {"wan-2.2": "mp4", "suno-v5": "mp3"}


def catalogue(models: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A private copy, so one app (or a test) can change prices without touching another."""
    return copy.deepcopy(MODELS if models is None else models)


@dataclass(frozen=True)
class Request:
    """A generation request that passed validation."""

    model: str
    prompt: str
    n: int
    seed: int | None
    response_format: str
    price_cents: object  # per image, as the catalogue says (None: no price; may be anything)
    width: int
    height: int
    default_media: str


def validate(body: object, models: list[dict[str, Any]]) -> Request:
    """Check `body` as the provider would; raise FakeError (400/404) naming the field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    model = _find_model(body.get("model"), models)
    caps = model.get("image_caps")
    if not isinstance(caps, dict):
        raise invalid(f"model {model['id']!r} does not generate images", "model",
                      "model_not_supported")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("prompt is required and must be a non-empty string", "prompt")
    n = _check_n(body.get("n", 1), caps.get("max_n"))
    _check_caps(body, caps)
    width, height = dimensions(body)
    return Request(model["id"], prompt, n, _check_seed(body.get("seed")),
                   _check_format(body.get("response_format", "url")),
                   caps.get("price_per_image_cents"), width, height,
                   DEFAULT_MEDIA.get(model["id"], "png"))


def _find_model(model_id: object, models: list[dict[str, Any]]) -> dict[str, Any]:
    if not isinstance(model_id, str) or not model_id:
        raise invalid("model is required", "model")
    for entry in models:
        if entry.get("id") == model_id:
            return entry
    raise FakeError(404, f"model {model_id!r} not found", code="model_not_found",
                    outcome="invalid", param="model")


def _check_n(n: object, max_n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise invalid("n must be a positive integer", "n")
    if isinstance(max_n, int) and n > max_n:
        raise invalid(f"n must be at most {max_n} for this model", "n")
    return n


def _check_caps(body: dict[str, Any], caps: dict[str, Any]) -> None:
    """aspect_ratio, size and quality against their lists; a missing list means no limit."""
    for field, cap in (("aspect_ratio", "aspect_ratios"), ("size", "sizes"),
                       ("quality", "qualities")):
        allowed = caps.get(cap)
        if field in body and isinstance(allowed, list) and body[field] not in allowed:
            raise invalid(f"{field} {body[field]!r} is not one of {', '.join(allowed)}", field)
    images = body.get("input_images", [])
    limit = caps.get("max_input_images")
    if not isinstance(images, list):
        raise invalid("input_images must be an array", "input_images")
    if isinstance(limit, int) and len(images) > limit:
        raise invalid(f"at most {limit} input images for this model", "input_images")


def _check_seed(seed: object) -> int | None:
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return seed
    raise invalid("seed must be an integer", "seed")


def _check_format(value: object) -> str:
    if value == "url" or value == "b64_json":
        return str(value)
    raise invalid("response_format must be 'url' or 'b64_json'", "response_format")


_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
_RATIO = re.compile(r"(\d{1,3}):(\d{1,3})")


def dimensions(body: dict[str, Any]) -> tuple[int, int]:
    """Pixel size of the result: `size` WxH, else `aspect_ratio` on a long side of 1024
    (or `resolution`), else square. Only image headers see it; pixel data stays tiny."""
    size = body.get("size")
    if isinstance(size, str) and (match := _SIZE.fullmatch(size)):
        return _side(int(match[1])), _side(int(match[2]))
    long_side = _side(_resolution(body.get("resolution")))
    ratio = body.get("aspect_ratio")
    if isinstance(ratio, str) and (match := _RATIO.fullmatch(ratio)):
        across, down = max(int(match[1]), 1), max(int(match[2]), 1)
        if across >= down:
            return long_side, _side(round(long_side * down / across))
        return _side(round(long_side * across / down)), long_side
    return long_side, long_side


def _resolution(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 1024


def _side(value: int) -> int:
    return min(max(value, 1), 8192)
