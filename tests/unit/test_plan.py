"""Planning is pure: parsing, validation against caps, splitting, seeds and prices."""

import json

import pytest

from pipeline.caps import Caps, caps_by_model
from pipeline.plan import (
    JobLine,
    LineError,
    derive_seed,
    parse_dollars,
    parse_lines,
    plan_lines,
    render_request,
    split_into_renders,
)

CAPS = {
    "flux": Caps("flux", max_n=4, aspect_ratios=("1:1", "16:9"), max_input_images=2,
                 price_per_image_cents=3),
    "gpt": Caps("gpt", max_n=10, sizes=("1024x1024",), qualities=("standard", "hd"),
                max_input_images=0, price_per_image_cents=4),
    "free": Caps("free", max_n=1),
}


def lines(*objs: object) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs)


def test_plain_and_batch_lines_parse_with_their_ids_and_metadata():
    text = lines(
        {"custom_id": "a", "model": "flux", "prompt": "p", "metadata": {"k": 1}, "style": "x"},
        "",
        {"custom_id": "b", "method": "POST", "url": "/v1/images/generations",
         "body": {"model": "gpt", "prompt": "q", "resolution": "2048"}},
    )
    a, b = parse_lines(text)
    assert isinstance(a, JobLine) and isinstance(b, JobLine)
    assert (a.line, a.custom_id, a.metadata) == (1, "a", {"k": 1})
    assert a.body == {"model": "flux", "prompt": "p", "style": "x"}  # unknown keys kept
    assert (b.line, b.custom_id, b.body["resolution"]) == (3, "b", "2048")


def test_each_bad_line_is_reported_with_its_number_and_reason():
    text = lines(
        {"model": "flux", "prompt": "ok", "custom_id": "x"},
        "{not json",
        {"prompt": "no model"},
        {"model": "flux"},
        {"model": "flux", "prompt": "dup", "custom_id": "x"},
        {"model": "flux", "prompt": "n", "n": 0},
        {"custom_id": "g", "method": "GET", "url": "/v1/images/generations", "body": {}},
        "[1, 2]",
    )
    errors = {e.line: e.reason for e in parse_lines(text) if isinstance(e, LineError)}
    assert "not valid JSON" in errors[2]
    assert errors[3] == "missing model"
    assert errors[4] == "missing prompt"
    assert errors[5] == "custom_id 'x' repeats line 1"
    assert "n must be an integer" in errors[6]
    assert "GET" in errors[7]
    assert "JSON object" in errors[8]
    assert 1 not in errors


def test_raw_u2028_inside_a_prompt_is_not_a_line_break():
    text = '{"model": "flux", "prompt": "a\u2028b"}\r\n{"model": "flux", "prompt": "c"}'
    first, second = parse_lines(text)
    assert first.body["prompt"] == "a\u2028b"
    assert (second.line, second.body["prompt"]) == (2, "c")


def test_caps_violations_name_the_field_and_what_is_allowed():
    entries = parse_lines(lines(
        {"model": "flux", "prompt": "p", "aspect_ratio": "5:4"},
        {"model": "gpt", "prompt": "p", "size": "512x512"},
        {"model": "gpt", "prompt": "p", "quality": "ultra"},
        {"model": "flux", "prompt": "p", "input_images": [{"url": "u"}], "image_urls": ["a", "b"]},
        {"model": "nope", "prompt": "p"},
        {"model": "free", "prompt": "p"},
        {"model": "flux", "prompt": "p", "aspect_ratio": "16:9", "n": 9},
    ))
    plan = plan_lines(entries, CAPS)
    reasons = {e.line: e.reason for e in plan.errors}
    assert "aspect_ratio '5:4'" in reasons[1] and "1:1, 16:9" in reasons[1]
    assert "size '512x512'" in reasons[2]
    assert "quality 'ultra'" in reasons[3]
    assert "3 input images" in reasons[4] and "at most 2" in reasons[4]
    assert "unknown model 'nope'" in reasons[5]
    assert "no known price" in reasons[6]
    assert [i.line.line for i in plan.items] == [7]


def test_n_is_split_into_calls_of_at_most_max_n_and_priced():
    plan = plan_lines(parse_lines(lines({"model": "flux", "prompt": "p", "n": 9})), CAPS)
    (item,) = plan.items
    assert [r.n for r in item.renders] == [4, 4, 1]
    summary = plan.by_model["flux"]
    assert (summary.items, summary.images, summary.calls, summary.max_cost_cents) == (1, 9, 3, 27)
    assert plan.max_cost_cents == 27


def test_split_seeds_follow_the_documented_rule():
    renders = split_into_renders(9, 4, seed=100)
    assert [(r.index, r.n, r.seed) for r in renders] == [(0, 4, 100), (1, 4, 104), (2, 1, 108)]
    assert [r.seed for r in split_into_renders(3, 1, None)] == [None, None, None]
    assert derive_seed(2**32 - 2, 4) == 2  # wraps within 32 bits
    assert derive_seed(2**40, 4) == 2**40 + 4  # a 64-bit seed is left 64-bit


def test_render_request_passes_every_key_and_sets_n_and_seed():
    body = {"model": "flux", "prompt": "p", "n": 9, "seed": 100, "x_future_knob": [1]}
    (_, second, _) = split_into_renders(9, 4, 100)
    request = render_request(body, second)
    assert request == {"model": "flux", "prompt": "p", "n": 4, "seed": 104, "x_future_knob": [1]}
    assert body["n"] == 9  # the stored body is not changed


@pytest.mark.parametrize(("text", "cents"), [("5.00", 500), ("$0.07", 7), ("12", 1200)])
def test_dollars_become_exact_cents(text, cents):
    assert parse_dollars(text) == cents


@pytest.mark.parametrize("text", ["abc", "0.001", "-1"])
def test_bad_dollar_amounts_are_refused(text):
    with pytest.raises(ValueError):
        parse_dollars(text)


def test_caps_parse_models_entries_and_skip_chat_models():
    caps = caps_by_model([
        {"id": "m", "output_modalities": ["image"],
         "image_caps": {"max_n": 2, "price_per_image_cents": 5, "aspect_ratios": ["1:1"]}},
        {"id": "chat", "output_modalities": ["text"]},
        {"id": "song", "output_modalities": ["audio"], "image_caps": {"max_n": 1}},
    ])
    assert set(caps) == {"m", "song"}
    assert caps["m"].max_n == 2 and caps["m"].price_per_image_cents == 5
    assert caps["song"].price_per_image_cents is None and caps["song"].sizes is None
