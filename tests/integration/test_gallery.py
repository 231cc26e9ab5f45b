"""What `imagebatch serve` reads (pipeline/gallery.py), on SQLite and PostgreSQL, from jobs
rendered through the pipeline against the fake upstream."""

from __future__ import annotations

from sqlalchemy import func, select

from pipeline import gallery
from pipeline.db import transaction
from pipeline.models import Image, JobItem
from pipeline.teams import set_team
from tests.helpers import assert_books_balance, run_job, submit

FLUX = {"model": "flux-2-dev", "prompt": "an otter", "aspect_ratio": "1:1"}


def _all_pages(svc, job_id, limit, **filters):
    pages, after = [], None
    while True:
        with svc.sessions() as session:
            page = gallery.job_files(session, job_id, after=after, limit=limit, **filters)
        pages.append(page.files)
        if page.next_after is None:
            return pages
        after = page.next_after


def test_job_files_pages_through_every_file_once_with_what_the_user_asked(svc):
    lines = [{**FLUX, "custom_id": f"o{i}", "prompt": f"otter {i}", "n": 2, "seed": 10 * i}
             for i in range(5)]
    lines.append({"model": "suno-v5", "prompt": "a shanty", "custom_id": "song"})
    job = run_job(svc, lines)
    assert job["status"] == "succeeded" and job["images"] == 11
    assert_books_balance(svc, job["id"])

    pages = _all_pages(svc, job["id"], limit=3)
    files = [f for page in pages for f in page]
    assert [len(page) for page in pages] == [3, 3, 3, 2]
    ids = [f.id for f in files]
    assert ids == sorted(ids) and len(set(ids)) == 11  # each file once, in stored order
    # What each card says: its line's custom_id, prompt, seed, model, size and cost.
    otter3 = sorted((f for f in files if f.custom_id == "o3"), key=lambda f: f.seed)
    assert [(f.prompt, f.model, f.size, f.kind) for f in otter3] == [
        ("otter 3", "flux-2-dev", "1:1", "image")] * 2
    assert otter3[0].seed == 30 and otter3[1].seed != 30  # the second render's derived seed
    assert sum(f.cost_cents for f in files) == job["spent_cents"]  # every cent on a card

    # By model: the one audio file, on one page, with no next page.
    with svc.sessions() as session:
        songs = gallery.job_files(session, job["id"], model="suno-v5")
        nothing = gallery.job_files(session, job["id"], model="wan-2.2")
    assert [(f.custom_id, f.kind, f.content_type) for f in songs.files] == [
        ("song", "audio", "audio/mpeg")]
    assert songs.next_after is None and nothing.files == []


def test_a_page_holds_only_its_jobs_files(svc):
    first = run_job(svc, [{**FLUX, "n": 3}])
    second = run_job(svc, [{**FLUX, "n": 2}])
    with svc.sessions() as session:
        one = gallery.job_files(session, first["id"])
        two = gallery.job_files(session, second["id"], after=0)
        last_of_first = max(f.id for f in one.files)
        after_first = gallery.job_files(session, first["id"], after=last_of_first)
    assert len(one.files) == 3 and len(two.files) == 2
    assert not {f.id for f in one.files} & {f.id for f in two.files}
    assert after_first.files == [] and after_first.next_after is None


def test_failed_items_come_with_their_reasons_page_by_page(svc):
    lines = [
        {**FLUX, "custom_id": "ok"},
        {**FLUX, "custom_id": "refused", "fake": {"status": 422}},
        {"model": "no-such-model", "prompt": "x", "custom_id": "unknown"},
        {**FLUX, "custom_id": "refused-too", "fake": {"status": 400}},
    ]
    job = run_job(svc, lines)
    assert job["status"] == "partial" and job["items_failed"] == 3
    with svc.sessions() as session:
        first = gallery.job_items(session, job["id"], "failed", limit=2)
        rest = gallery.job_items(session, job["id"], "failed", after=first.next_after, limit=2)
        flux_only = gallery.job_items(session, job["id"], "failed", model="flux-2-dev")
        cancelled = gallery.job_items(session, job["id"], "cancelled")
    items = first.items + rest.items
    assert [i.custom_id for i in items] == ["refused", "unknown", "refused-too"]
    assert rest.next_after is None
    reasons = {i.custom_id: i.reason for i in items}
    assert "422" in reasons["refused"] and "400" in reasons["refused-too"]
    assert "no-such-model" in reasons["unknown"]  # refused when planned: the item's reason
    # The model filter reaches the items that were planned for that model.
    assert [i.custom_id for i in flux_only.items] == ["refused", "refused-too"]
    assert cancelled.items == []


def test_the_model_filter_offers_the_media_models_the_cache_knows(svc):
    run_job(svc, [FLUX])  # fills the model cache from /models
    with svc.sessions() as session:
        models = gallery.known_models(session)
    assert {"flux-2-dev", "suno-v5", "wan-2.2"} <= set(models)
    assert "gpt-4o-mini" not in models  # a text model makes no files


def test_jobs_list_newest_first_with_progress_and_spend(svc):
    done = run_job(svc, [{**FLUX, "n": 2}, {**FLUX, "fake": {"status": 422}}])
    waiting = submit(svc, [FLUX, FLUX])  # not planned yet
    with svc.sessions() as session:
        rows = gallery.list_job_rows(session)
        older = gallery.list_job_rows(session, before=waiting)
        missing = gallery.job_row(session, waiting + 1)
    assert [r.id for r in rows] == [waiting, done["id"]]
    assert [r.id for r in older] == [done["id"]]
    finished = rows[1]
    assert (finished.status, finished.items_done, finished.items_total, finished.items_failed,
            finished.files, finished.spent_cents, finished.progress, finished.eta_seconds) == (
        "partial", 2, 2, 1, 2, done["spent_cents"], 1.0, None)
    assert rows[0].status == "pending" and rows[0].progress == 0.0
    assert missing is None


def test_spend_per_day_by_team_and_model_is_the_ledgers(svc):
    with transaction(svc.sessions) as session:
        set_team(session, "t", 100_000, "month")
    job = run_job(svc, [{**FLUX, "n": 2}, {"model": "suno-v5", "prompt": "song"}])
    with svc.sessions() as session:
        by_team = gallery.spend_by_day(session, "team")
        by_model = gallery.spend_by_day(session, "model")
        teams = gallery.team_budgets(session)
        stored = session.scalar(select(func.sum(Image.cost_cents)).where(
            Image.job_id == job["id"]))
    assert [(r.key, r.spent_cents) for r in by_team] == [("t", job["spent_cents"])]
    assert {r.key: r.spent_cents for r in by_model} == {"flux-2-dev": 6, "suno-v5": 5}
    assert job["spent_cents"] == stored == 11
    assert [(t.team, t.limit_cents, t.spent_cents, t.reserved_cents, t.left_cents)
            for t in teams] == [("t", 100_000, 11, 0, 100_000 - 11)]


def test_a_prompt_is_read_back_as_it_was_written(svc):
    hostile = "<script>alert(1)</script> \u2028 \"quotes\" & 'single'"
    job = run_job(svc, [{**FLUX, "prompt": hostile, "custom_id": "<b>id</b>"}])
    with svc.sessions() as session:
        (card,) = gallery.job_files(session, job["id"]).files
        line = session.scalar(select(JobItem.line).where(JobItem.job_id == job["id"]))
    # The query returns the text as it is; the pages escape it (tests/integration/test_serve.py).
    assert (card.prompt, card.custom_id, card.line) == (hostile, "<b>id</b>", line)
