"""A /models catalogue that says things no price can mean: each bad entry's caps are refused
with the reason its lines will carry, and the built-in catalogue is all accepted (the jobs
that run on such a catalogue: tests/integration/test_catalogue.py)."""

from __future__ import annotations

from fake_upstream.catalog import MODELS
from pipeline.caps import caps_by_model
from tests.integration.test_catalogue import BAD, GOOD, ODD_ENTRIES


def test_the_caps_of_every_bad_entry_can_price_nothing() -> None:
    """Whatever reads the caps (a planner without the refusal check too) finds no price."""
    caps = caps_by_model([*(entry for entry, _ in BAD.values()), *ODD_ENTRIES, GOOD])
    assert set(caps) == {*BAD, "good", "caps-list"} - {"modalities-text"}
    for name in BAD:
        assert caps[name].refused and caps[name].price_per_image_cents is None
        assert caps[name].max_n is None
    assert caps["good"].refused is None and caps["good"].price_per_image_cents == 2
    assert caps["caps-list"].price_per_image_cents is None  # no caps: no price, as before
    free = caps_by_model([BAD["free"][0]], allow_free=True)["free"]
    assert (free.refused, free.price_per_image_cents) == (None, 0)
    assert caps_by_model([BAD["negative"][0]], allow_free=True)["negative"].refused


def test_the_built_in_catalogue_is_all_accepted() -> None:
    caps = caps_by_model(MODELS)
    assert all(c.refused is None for c in caps.values())
