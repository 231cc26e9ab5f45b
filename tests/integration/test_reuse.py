"""Seeded reuse (issue 19 item 2): a seeded request that already succeeded is copied, not sent
again, on SQLite and PostgreSQL, with the fake upstream over HTTP and files or moto's S3."""

from __future__ import annotations

import hashlib
import json
import uuid

import boto3
import pytest
from sqlalchemy import select

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import create_job
from pipeline.ledger import job_ledger_totals
from pipeline.models import Attempt, Image, LedgerEntry, Render
from pipeline.plan import parse_lines
from pipeline.report import ReportFilter, ledger_report
from pipeline.runtime import start_services
from tests.conftest import make_settings
from tests.helpers import assert_books_balance, render_all, summary

BUCKET = "imagebatch-reuse"
AWS_SECRET = "aws-SECRET-reuse-never-printed-0123"

# flux-2-dev: 3 cents an image, at most 4 a call: the otters are two calls (4 + 2).
OTTERS = {"custom_id": "otters", "model": "flux-2-dev", "prompt": "sea otters", "n": 6,
          "seed": 42, "metadata": {"split": "train"}}
FOX = {"custom_id": "fox", "model": "flux-2-dev", "prompt": "a red fox", "seed": 7,
       "aspect_ratio": "16:9"}
UNSEEDED = {"custom_id": "plain", "model": "flux-2-dev", "prompt": "a heron", "n": 2}
LINES = [OTTERS, FOX, UNSEEDED]
FRESH_CENTS = (6 + 1 + 2) * 3


def submit(svc, lines, *, budget_cents: int = 10_000, reuse: bool = True) -> int:
    text = "\n".join(json.dumps(line) for line in lines)
    with transaction(svc.sessions) as session:
        return create_job(session, team="t", budget_cents=budget_cents,
                          entries=parse_lines(text), reuse=reuse)


def run(svc, lines, **options) -> dict:
    job_id = submit(svc, lines, **options)
    while render_ids := dispatch_pending(svc):
        render_all(svc, render_ids)
    assert_books_balance(svc, job_id)
    return summary(svc, job_id)


def files(svc, job_id: int) -> dict[tuple[int, int, int], Image]:
    """The job's image rows by (line, render, index)."""
    with svc.sessions() as session:
        rows = session.execute(
            select(Image, Render).join(Render, Render.id == Image.render_id)
            .where(Image.job_id == job_id)).all()
        session.expunge_all()
    return {(render.item_id, render.render_index, image.image_index): image
            for image, render in rows}


def by_position(svc, job_id: int) -> dict[tuple[int, int], bytes]:
    """The stored bytes of the job's files by (render index, image index) and line order."""
    with svc.sessions() as session:
        rows = session.execute(
            select(Image.key, Render.item_id, Render.render_index, Image.image_index)
            .join(Render, Render.id == Image.render_id).where(Image.job_id == job_id)
            .order_by(Render.item_id, Render.render_index, Image.image_index)).all()
    first_item = min(row.item_id for row in rows)
    return {(row.item_id - first_item, row.render_index, row.image_index): svc.store.get(row.key)
            for row in rows}


def ledger_kinds(svc, job_id: int) -> list[tuple[str, int]]:
    with svc.sessions() as session:
        return sorted(session.execute(select(LedgerEntry.kind, LedgerEntry.amount_cents)
                                      .where(LedgerEntry.job_id == job_id)).all())


def requests_sent(fake) -> list[dict]:
    return [entry["body"] for entry in fake.requests()]


def test_the_second_job_of_a_seeded_file_sends_only_its_unseeded_lines(svc, fake):
    first = run(svc, LINES)
    assert (first["status"], first["images"], first["spent_cents"]) == (
        "succeeded", 9, FRESH_CENTS)
    assert fake.stats()["calls"] == 4  # otters 4 + 2, the fox, the heron
    fake.reset()
    # Other custom_ids and metadata: they are not sent upstream, so the requests are equal.
    again = [{**line, "custom_id": f"{line['custom_id']}-2", "metadata": {"split": "test"}}
             for line in LINES]
    second = run(svc, again)
    assert (second["status"], second["images"], second["items_succeeded"]) == (
        "succeeded", 9, 3)
    assert fake.stats()["calls"] == 1  # the unseeded heron only: meant to come out different
    assert requests_sent(fake)[0]["prompt"] == "a heron"
    assert second["spent_cents"] == 2 * 3 and second["reserved_cents"] == 0
    assert fake.stats()["billed_cents"] == 2 * 3
    # Byte-identical files under the new job's own keys.
    old, new = by_position(svc, first["id"]), by_position(svc, second["id"])
    assert [new[k] for k in sorted(new) if k[0] < 2] == [old[k] for k in sorted(old) if k[0] < 2]
    assert all(not image.key.startswith(f"job-{first['id']:06d}/")
               for image in files(svc, second["id"]).values())
    # The ledger: a 0-cent reserve and a 0-cent `reused` per copied render, to the cent.
    kinds = ledger_kinds(svc, second["id"])
    assert kinds.count(("reused", 0)) == 3 and kinds.count(("reserve", 0)) == 3
    assert ("charge", 6) in kinds and len(kinds) == 8
    totals = job_ledger_totals(svc.sessions(), second["id"])
    assert (totals.spent_cents, totals.reserved_cents, totals.released_cents) == (6, 0, 0)
    with svc.sessions() as session:
        reused = session.scalars(select(Render).where(Render.job_id == second["id"],
                                                      Render.reused_from.is_not(None))).all()
        originals = {r.id for r in session.scalars(select(Render).where(
            Render.job_id == first["id"]))}
        row = ledger_report(session, ReportFilter(job=second["id"]))[0]
        costs = session.scalars(select(Image.cost_cents).join(Render).where(
            Render.id.in_([r.id for r in reused]))).all()
    assert len(reused) == 3 and {r.reused_from for r in reused} <= originals
    assert all(r.request_key is None for r in reused)  # copies are never looked up
    assert costs == [0] * 7
    assert (row.calls, row.images, row.reused_images, row.saved_cents) == (1, 2, 7, 7 * 3)


def test_no_reuse_pays_again_and_a_job_at_its_cap_still_gets_its_copies(svc, fake):
    first = run(svc, [OTTERS, FOX])
    fake.reset()
    paid_again = run(svc, [OTTERS, FOX], reuse=False)
    assert (paid_again["status"], paid_again["spent_cents"]) == ("succeeded", 7 * 3)
    assert fake.stats()["calls"] == 3 and fake.stats()["billed_cents"] == 7 * 3
    assert "reused" not in {kind for kind, _ in ledger_kinds(svc, paid_again["id"])}
    fake.reset()
    # Nothing left to spend: copies hold no budget, so a 0-cent cap is enough.
    free = run(svc, [OTTERS, FOX], budget_cents=0)
    assert (free["status"], free["images"], free["spent_cents"]) == ("succeeded", 7, 0)
    assert fake.stats()["calls"] == 0
    # The copies point at an original (a render that called), never at a copy.
    with svc.sessions() as session:
        sources = set(session.scalars(select(Render.reused_from).where(
            Render.job_id == free["id"])))
        called = set(session.scalars(select(Render.id).where(
            Render.job_id.in_([first["id"], paid_again["id"]]))))
    assert sources <= called


def test_a_changed_parameter_a_changed_seed_or_no_seed_is_sent(svc, fake):
    run(svc, [FOX])
    fake.reset()
    variants = [{**FOX, "custom_id": "a", "aspect_ratio": "1:1"},
                {**FOX, "custom_id": "b", "seed": 8},
                {**FOX, "custom_id": "c", "n": 2},
                {**FOX, "custom_id": "d", "response_format": "b64_json"},
                {key: value for key, value in FOX.items() if key != "seed"} | {"custom_id": "e"}]
    s = run(svc, variants)
    assert (s["status"], s["images"]) == ("succeeded", 6)
    assert fake.stats()["calls"] == 5
    fake.reset()
    again = run(svc, [{**UNSEEDED, "custom_id": "x"}, {**UNSEEDED, "custom_id": "y"}])
    assert fake.stats()["calls"] == 2 and again["spent_cents"] == 4 * 3


def test_a_copy_whose_original_files_are_gone_calls_and_pays_instead(svc, fake):
    first = run(svc, [FOX])
    for image in files(svc, first["id"]).values():
        svc.store.delete(image.key)
    fake.reset()
    second = run(svc, [FOX])
    assert (second["status"], second["images"], second["spent_cents"]) == ("succeeded", 1, 3)
    assert fake.stats()["calls"] == 1
    # The failed copy is a 0-cent attempt released; the call that followed is charged.
    assert ledger_kinds(svc, second["id"]) == [
        ("charge", 3), ("release", 0), ("reserve", 0), ("reserve", 3)]
    with svc.sessions() as session:
        attempts = session.scalars(select(Attempt.outcome).join(Render).where(
            Render.job_id == second["id"]).order_by(Attempt.number)).all()
    assert attempts == ["released", "charged"]
    # The new render called: it is the one a third job copies.
    fake.reset()
    third = run(svc, [FOX])
    assert fake.stats()["calls"] == 0 and third["images"] == 1


def test_two_jobs_of_the_same_seeded_file_at_once_each_store_whole_files(svc, fake):
    first, second = submit(svc, [OTTERS, FOX]), submit(svc, [OTTERS, FOX])
    render_ids = dispatch_pending(svc)
    while render_ids:
        render_all(svc, render_ids, concurrency=8)
        render_ids = dispatch_pending(svc)
    for job_id in (first, second):
        s = summary(svc, job_id)
        assert (s["status"], s["images"]) == ("succeeded", 7)
        assert_books_balance(svc, job_id)  # each file's bytes match its recorded sha256
    # Both may have paid for a render, never more than once each.
    assert fake.stats()["calls"] <= 6
    assert sum(summary(svc, j)["spent_cents"] for j in (first, second)) == (
        fake.stats()["billed_cents"])


@pytest.fixture
def s3_svc(s3_endpoint, monkeypatch, tmp_path, fake, database_url):
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ENDPOINT_URL_S3", s3_endpoint), ("AWS_ACCESS_KEY_ID", "test"),
                        ("AWS_SECRET_ACCESS_KEY", AWS_SECRET),
                        ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
                        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
    prefix = f"p-{uuid.uuid4().hex[:12]}"
    services = start_services(make_settings(tmp_path / "data", fake.base_url,
                                            database_url=database_url,
                                            storage_url=f"s3://{BUCKET}/{prefix}"))
    yield services
    services.close()


def test_on_s3_a_reused_render_is_a_server_side_copy(s3_svc, fake):
    first = run(s3_svc, [OTTERS, FOX])
    fake.reset()
    second = run(s3_svc, [{**OTTERS, "custom_id": "again"}, FOX])
    assert (second["status"], second["images"], second["spent_cents"]) == ("succeeded", 7, 0)
    assert fake.stats()["calls"] == 0 and fake.stats()["media_requests"] == 0
    client = boto3.session.Session().client("s3")
    old, new = files(s3_svc, first["id"]), files(s3_svc, second["id"])
    assert len(new) == 7
    for image in new.values():
        obj = client.get_object(Bucket=BUCKET, Key=f"{s3_svc.store.prefix}/{image.key}")
        data = obj["Body"].read()
        assert hashlib.sha256(data).hexdigest() == image.sha256
        assert obj["ContentType"] == image.content_type
    assert sorted(i.sha256 for i in new.values()) == sorted(i.sha256 for i in old.values())


def test_exports_list_reused_files_with_the_uri_they_were_copied_from(svc, fake, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.datasets import export_dataset
    from pipeline.export import export_rows

    first = run(svc, [OTTERS, UNSEEDED])
    sent_ids = {entry["request_id"] for entry in fake.requests()}
    fake.reset()
    second = run(svc, [OTTERS, UNSEEDED])
    with svc.sessions() as session:
        old = {(r["custom_id"], r["render"], r["index"]): r
               for r in export_rows(session, first["id"], svc.store.uri)}
        rows = list(export_rows(session, second["id"], svc.store.uri))
        export_dataset(session, second["id"], svc.store, "parquet", str(tmp_path / "t.parquet"))
    table = pq.read_table(tmp_path / "t.parquet").to_pylist()
    # Fresh files: the upstream's request id of their call, nothing reused.
    assert all(r["request_id"] in sent_ids and r["reused_from"] is None
               for r in old.values())
    otters = [r for r in rows if r["custom_id"] == "otters"]
    assert len(otters) == 6 and len(rows) == 8
    for row in otters:  # copies: the original file's URI, no call of their own
        original = old[("otters", row["render"], row["index"])]
        assert row["reused_from"] == original["uri"] != row["uri"]
        assert (row["sha256"], row["cost_cents"], row["request_id"]) == (
            original["sha256"], 0, None)
    heron = [r for r in rows if r["custom_id"] == "plain"]
    assert len(heron) == 2 and all(
        r["reused_from"] is None and r["request_id"] == fake.requests()[0]["request_id"]
               for r in heron)
    assert [(r["uri"], r["reused_from"], r["request_id"]) for r in table] == [
        (r["uri"], r["reused_from"], r["request_id"]) for r in rows]


def test_the_lookup_uses_the_partial_index_of_succeeded_seeded_renders(svc, fake):
    """`find_source` reads ix_renders_request_key (succeeded renders that called, with a key),
    on both databases: the lookup costs an index probe, not a scan of every render."""
    from pipeline import queries

    run(svc, [FOX])
    statement = queries._REUSE_CANDIDATES.params(key=1, render=0, limit=4)
    with svc.engine.connect() as db:
        sql = str(statement.compile(dialect=db.dialect, compile_kwargs={"literal_binds": True}))
        if db.dialect.name == "postgresql":
            db.exec_driver_sql("SET enable_seqscan = off")  # tiny tables: a scan is cheaper
            plan = [row[0] for row in db.exec_driver_sql("EXPLAIN " + sql)]
        else:
            plan = [row[-1] for row in db.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    assert any("ix_renders_request_key" in line for line in plan), plan


def test_a_worker_lost_while_copying_leaves_nothing_held_and_the_copy_is_made_again(svc, fake):
    """The copy's 0-cent reservation is committed, then the worker dies (before the files are
    copied): the sweeper releases it (0 cents, nothing was sent) and the render is reused on
    its next run, never sent."""
    from datetime import timedelta

    from sqlalchemy import update

    from pipeline.models import utcnow
    from pipeline.render import Begun, begin_attempt
    from pipeline.sweep import sweep

    run(svc, [FOX])
    fake.reset()
    job_id = submit(svc, [FOX])
    (render_id,) = dispatch_pending(svc)
    with transaction(svc.sessions) as session:
        begun = begin_attempt(svc, render_id, None, session)
    assert isinstance(begun, Begun) and begun.source is not None and begun.amount_cents == 0
    with transaction(svc.sessions) as session:  # its lease runs out: the worker is gone
        session.execute(update(Render).where(Render.id == render_id)
                        .values(lease_until=utcnow() - timedelta(seconds=1)))
    assert sweep(svc.sessions, svc.settings) == [render_id]
    assert summary(svc, job_id)["reserved_cents"] == 0
    assert ledger_kinds(svc, job_id) == [("release", 0), ("reserve", 0)]
    render_all(svc, dispatch_pending(svc))
    s = summary(svc, job_id)
    assert (s["status"], s["images"], s["spent_cents"]) == ("succeeded", 1, 0)
    assert fake.stats()["calls"] == 0
    assert_books_balance(svc, job_id)
    assert ledger_kinds(svc, job_id) == [("release", 0), ("reserve", 0), ("reserve", 0),
                                         ("reused", 0)]


def test_a_cap_that_fits_only_the_fresh_renders_runs_the_whole_mixed_job(svc, fake):
    run(svc, [OTTERS, FOX])
    fake.reset()
    s = run(svc, [OTTERS, FOX, UNSEEDED], budget_cents=2 * 3)  # the heron's price, exactly
    assert (s["status"], s["images"], s["spent_cents"], s["reserved_cents"]) == (
        "succeeded", 9, 6, 0)
    assert fake.stats()["calls"] == 1 and fake.stats()["billed_cents"] == 6
