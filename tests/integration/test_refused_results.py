"""Delivered, charged, refused, not retried: whatever reason we refuse a result the provider
made (too large, by URL or as b64_json, even past what a stream may hold; bytes that are not
media; base64 that does not decode), it is charged once and never asked for again (the same
request makes the same result: another call is another bill)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from fake_upstream.app import FakeServer
from pipeline.models import Attempt, Render
from pipeline.runtime import start_services
from pipeline.settings import Settings
from tests.helpers import assert_books_balance, run_job

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3 cents an image
CAP = 10_000  # IMAGEBATCH_MAX_MEDIA_BYTES in these tests
B64 = {"response_format": "b64_json"}


@pytest.mark.parametrize(("line", "reason"), [
    # Past everything a response may hold (16 files at the cap): the stream is not read on.
    ({**B64, "fake": {"media_bytes": 1_500_000}}, "too large to keep"),
    ({**B64, "n": 2, "fake": {"media_bytes": 1_500_000, "chunk": 65536}}, "too large to keep"),
    ({**B64, "fake": {"media_bytes": 3 * CAP}}, f"more than the {CAP} byte cap"),
    ({"fake": {"media_bytes": 3 * CAP}}, f"over the {CAP} cap"),
    ({"fake": {"garbage": True}}, "is not media"),
    ({**B64, "fake": {"garbage": True}}, "is not media"),
    ({**B64, "fake": {"bad_b64": True}}, "not valid base64"),
], ids=["b64-past-the-stream-cap", "b64-n2-chunked", "b64-over-cap", "url-over-cap",
        "url-garbage", "b64-garbage", "b64-invalid"])
def test_a_refused_result_is_charged_once_and_never_asked_again(
        settings: Settings, fake: FakeServer, line: dict[str, Any], reason: str) -> None:
    svc = start_services(replace(settings, max_media_bytes=CAP, max_attempts=4))
    try:
        s = run_job(svc, [{**FLUX, **line}, FLUX])
        assert_books_balance(svc, s["id"])
        with svc.sessions() as session:
            attempts = session.execute(
                select(Attempt.outcome, Render.error).join(Render)
                .where(Render.job_id == s["id"]).order_by(Render.id)).all()
    finally:
        svc.close()
    n = line.get("n", 1)
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 1, 1)
    assert s["spent_cents"] == 3 * (n + 1) == fake.stats()["billed_cents"]
    assert s["unknown_cents"] == 0
    assert fake.stats()["calls"] == 2  # one call each: the refused result is not asked again
    (refused_outcome, error), (kept_outcome, _) = attempts
    assert (refused_outcome, kept_outcome) == ("charged", "charged")
    assert reason in error
