"""The routes of `imagebatch serve` (web/app.py) over real HTTP, on SQLite and PostgreSQL, with
files on disk and in S3 (moto): pages, media, the token rule, traversal, escaping."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import boto3
import httpx
import pytest
import sqlalchemy as sa
from aiohttp import web

from pipeline.db import transaction
from pipeline.models import Image
from pipeline.runtime import start_services
from pipeline.storage import open_store
from pipeline.teams import set_team
from tests.helpers import run_job, use_s3
from web.app import COOKIE, loopback_hosts, make_app

TOKEN = "serve-token-0123456789-abcdef"
FLUX = {"model": "flux-2-dev", "prompt": "an otter", "aspect_ratio": "1:1"}
S3_SECRET = "serve-test-secret-key"
HOSTILE = "<script>window.pwned=1</script><img src=x onerror=alert(1)>"


@contextmanager
def serving(svc, *, token: str | None = None, store=None) -> Iterator[str]:
    """The app on 127.0.0.1 (a port of its own), served by a real aiohttp server on a
    thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = make_app(svc.sessions, store or open_store(svc.settings.storage_url), token=token,
                   hosts=None if token else loopback_hosts(port))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def rendered(svc):
    """A job with images, an audio file, a prompt holding markup and a refused line."""
    job = run_job(svc, [
        {**FLUX, "n": 2, "custom_id": "otter"},
        {**FLUX, "prompt": HOSTILE, "custom_id": "<b>bold</b>",
         "fake": {"revised_prompt": "</div><script>window.pwned=3</script>"}},
        {"model": "suno-v5", "prompt": "a shanty", "custom_id": "song"},
        {**FLUX, "custom_id": "refused", "fake": {"status": 422}},
    ])
    assert job["status"] == "partial" and job["images"] == 4
    return job


def _image_ids(svc, job_id: int) -> dict[str, int]:
    with svc.sessions() as session:
        rows = session.execute(sa.select(Image.id, Image.content_type, Image.key)
                               .where(Image.job_id == job_id).order_by(Image.id)).all()
    return {row.key: row.id for row in rows}


def test_pages_show_jobs_files_reasons_and_spend_with_every_user_string_escaped(svc, rendered):
    with transaction(svc.sessions) as session:
        set_team(session, "t", 50_000, "month")
    with serving(svc) as base, httpx.Client(base_url=base) as http:
        jobs = http.get("/")
        rows = http.get("/jobs/rows")
        gallery = http.get(f"/jobs/{rendered['id']}")
        failed = http.get(f"/jobs/{rendered['id']}", params={"status": "failed"})
        spend = http.get("/spend")
    for answer in (jobs, rows, gallery, failed, spend):
        assert answer.status_code == 200
        assert "<script>window" not in answer.text and "<img src=x" not in answer.text
        assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert f'href="/jobs/{rendered["id"]}"' in jobs.text and "partial" in rows.text
    assert 'data-refresh="/jobs/rows"' in jobs.text  # the list polls its rows
    assert rendered["spent_cents"] == 14 and "$0.14 of $100.00" in rows.text  # spent of cap
    assert gallery.text.count('<img src="/media/') == 3
    assert gallery.text.count('<audio controls') == 1
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in gallery.text
    assert "&lt;b&gt;bold&lt;/b&gt;" in gallery.text and "<b>bold</b>" not in gallery.text
    assert "revised: &lt;/div&gt;&lt;script&gt;" in gallery.text
    assert "refused" in failed.text and "HTTP 422" in failed.text
    assert "$0.14" in spend.text and "<svg" in spend.text and "flux-2-dev" in spend.text
    assert "$500.00" in spend.text  # the team's limit


def test_media_served_as_stored_and_nothing_outside_the_storage_root(svc, rendered, tmp_path):
    store = open_store(svc.settings.storage_url)
    ids = _image_ids(svc, rendered["id"])
    key, image_id = next((key, id_) for key, id_ in ids.items() if key.endswith(".png"))
    others = [id_ for id_ in ids.values() if id_ != image_id]
    outside = tmp_path / "secret.txt"
    outside.write_text("not media")
    root = Path(store.root)
    (root / "escape.png").symlink_to(outside)
    with transaction(svc.sessions) as session:  # a row pointing at a symlink out of the root
        session.execute(sa.update(Image).where(Image.id == others[0]).values(key="escape.png"))
        session.execute(sa.update(Image).where(Image.id == others[1])
                        .values(key="../../secret.txt"))
    with serving(svc) as base, httpx.Client(base_url=base) as http:
        media = http.get(f"/media/{image_id}")
        symlinked = http.get(f"/media/{others[0]}")
        dotted = http.get(f"/media/{others[1]}")
        missing = http.get("/media/999999")
        raw = [http.get(path).status_code for path in (
            "/media/../../etc/passwd", "/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
            "/media/-1", "/media/1%2f..", "/jobs/1/../../../etc/passwd")]
    assert media.status_code == 200 and media.content == store.get(key)
    assert media.headers["content-type"] == "image/png"
    assert media.headers["x-content-type-options"] == "nosniff"
    assert symlinked.status_code == dotted.status_code == missing.status_code == 404
    assert "not media" not in symlinked.text + dotted.text
    assert all(status in (403, 404) for status in raw), raw


def test_the_token_guards_every_route_and_never_shows(svc, rendered):
    image_id = next(iter(_image_ids(svc, rendered["id"]).values()))
    seen = []
    with serving(svc, token=TOKEN) as base:
        with httpx.Client(base_url=base) as anonymous:
            for path in ("/", "/jobs/rows", f"/jobs/{rendered['id']}", "/spend",
                         f"/media/{image_id}", "/static/app.js"):
                answer = anonymous.get(path)
                seen.append(answer)
                assert answer.status_code == 401, path
            page = anonymous.get("/", headers={"Accept": "text/html"})
            assert page.status_code == 303 and page.headers["location"] == "/login"
            wrong = anonymous.get("/", headers={"Authorization": f"Bearer {TOKEN}x"})
            assert wrong.status_code == 401
            bad_login = anonymous.post("/login", data={"token": TOKEN[:-1]})
            assert bad_login.status_code == 401 and "not the token" in bad_login.text
            foreign = anonymous.post("/login", data={"token": TOKEN},
                                     headers={"Origin": "http://evil.example"})
            assert foreign.status_code == 403 and COOKIE not in foreign.headers.get(
                "set-cookie", "")
            seen += [page, wrong, bad_login, foreign]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as bearer:
            pages = [bearer.get(path) for path in ("/", f"/jobs/{rendered['id']}", "/spend",
                                                   f"/media/{image_id}")]
            assert [p.status_code for p in pages] == [200] * 4
            seen += pages
        with httpx.Client(base_url=base) as browser:
            login = browser.post("/login", data={"token": TOKEN})
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert browser.get("/").status_code == 200  # the cookie carries on
            seen += [login, browser.get("/spend")]
    for answer in seen:
        assert TOKEN not in answer.text and TOKEN not in str(answer.headers)


def test_read_only_and_loopback_names_only_without_a_token(svc, rendered):
    image_id = next(iter(_image_ids(svc, rendered["id"]).values()))
    with serving(svc) as base, httpx.Client(base_url=base) as http:
        writes = [http.request(method, path).status_code
                  for method in ("POST", "PUT", "DELETE", "PATCH")
                  for path in ("/", f"/jobs/{rendered['id']}", f"/media/{image_id}")]
        rebound = http.get("/", headers={"Host": "attacker.example"})
        local = http.get("/", headers={"Host": "localhost"})
        bad_after = http.get(f"/jobs/{rendered['id']}", params={"after": "1 OR 1=1"})
        bad_status = http.get(f"/jobs/{rendered['id']}", params={"status": "<script>"})
        bad_numbers = [http.get(path, params=params).status_code for path, params in (
            (f"/jobs/{rendered['id']}", {"after": "\u00b2"}), ("/", {"before": "-1"}),
            ("/jobs/rows", {"before": "\u0661"}), ("/", {"before": "9" * 19}))]
        no_job = http.get("/jobs/999999")
    assert set(writes) == {405}
    assert rebound.status_code == 421 and local.status_code == 200
    assert bad_after.status_code == bad_status.status_code == 400
    assert bad_numbers == [400] * 4
    assert "<script>" not in bad_status.text
    assert no_job.status_code == 404


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    use_s3(monkeypatch, s3_endpoint, S3_SECRET)
    bucket = f"serve-{os.getpid()}"
    client = boto3.session.Session().client("s3")
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return bucket


def test_s3_media_proxied_without_credentials_or_presigned_urls(settings, s3_env, request):
    prefix = request.node.name[:40].replace("[", "-").replace("]", "")
    s3_settings = replace(settings, storage_url=f"s3://{s3_env}/{prefix}")
    svc = start_services(s3_settings)
    try:
        job = run_job(svc, [{**FLUX, "n": 2}, {"model": "suno-v5", "prompt": "song"}])
        store = open_store(s3_settings.storage_url)
        ids = _image_ids(svc, job["id"])
        with serving(svc, store=store) as base, httpx.Client(base_url=base) as http:
            gallery = http.get(f"/jobs/{job['id']}")
            media = {key: http.get(f"/media/{image_id}") for key, image_id in ids.items()}
    finally:
        svc.close()
    assert gallery.status_code == 200
    for key, answer in media.items():
        assert answer.status_code == 200 and answer.content == store.get(key)
        shown = answer.text if answer.headers["content-type"].startswith("text") else ""
        assert "X-Amz" not in str(answer.headers) and S3_SECRET not in shown
    assert "X-Amz-Signature" not in gallery.text and "s3://" not in gallery.text
    assert {a.headers["content-type"] for a in media.values()} == {"image/png", "audio/mpeg"}
