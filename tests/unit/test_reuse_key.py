"""The seeded-reuse key is pure: the request sent upstream, canonical, digested."""

import json

from pipeline.plan import JobLine, parse_lines, render_request, split_into_renders
from pipeline.reuse import canonical, request_key


def keys_of(*objs: object) -> list[list[int | None]]:
    """Each line's renders' keys, as the pipeline computes them (flux: 4 images a call)."""
    keys = []
    for line in parse_lines("\n".join(json.dumps(o) for o in objs)):
        assert isinstance(line, JobLine)
        specs = split_into_renders(int(line.body.get("n", 1)), 4, line.body.get("seed"))
        keys.append([request_key(render_request(line.body, spec)) for spec in specs])
    return keys


OTTER = {"model": "flux", "prompt": "an otter", "seed": 42, "n": 2, "aspect_ratio": "1:1"}


def test_the_same_request_gets_the_same_key_whatever_its_key_order():
    reordered = dict(reversed(list(OTTER.items())))
    assert keys_of(OTTER, reordered) == [keys_of(OTTER)[0]] * 2
    assert isinstance(keys_of(OTTER)[0][0], int)
    assert -2**63 <= keys_of(OTTER)[0][0] < 2**63  # fits a BIGINT


def test_custom_id_and_metadata_are_not_part_of_the_key():
    plain = keys_of(OTTER)[0]
    assert keys_of({"custom_id": "a", "metadata": {"split": "train"}, **OTTER})[0] == plain
    assert keys_of({"custom_id": "b", "metadata": {"split": "test", "x": 1}, **OTTER})[0] == plain
    batch = {"custom_id": "c", "method": "POST", "url": "/v1/images/generations", "body": OTTER}
    assert keys_of(batch)[0] == plain


def test_a_request_without_a_seed_has_no_key():
    unseeded = {key: value for key, value in OTTER.items() if key != "seed"}
    assert keys_of(unseeded) == [[None]]
    assert keys_of({**OTTER, "seed": None}) == [[None]]
    assert request_key({"model": "flux", "prompt": "x", "n": 1}) is None


def test_every_parameter_sent_upstream_is_part_of_the_key():
    base = keys_of(OTTER)[0][0]
    for changed in ({"prompt": "an otter!"}, {"seed": 43}, {"n": 1}, {"model": "flux-2"},
                    {"aspect_ratio": "16:9"}, {"response_format": "b64_json"},
                    {"style": "EDM"}, {"input_images": [{"url": "https://x/a.png"}]}):
        assert keys_of({**OTTER, **changed})[0][0] != base, changed


def test_each_render_of_a_split_item_has_its_own_key():
    """n=6 at 4 a call: two calls, with seeds 42 and 46: two different requests."""
    first, second = keys_of({**OTTER, "n": 6})[0]
    assert first != second
    assert keys_of({**OTTER, "n": 4})[0] == [first]  # the first call is the same request


def test_the_canonical_form_is_the_body_sent_with_sorted_keys():
    assert canonical({"prompt": "é", "model": "m", "seed": 1}) == (
        b'{"model":"m","prompt":"\\u00e9","seed":1,"sse":true}')
