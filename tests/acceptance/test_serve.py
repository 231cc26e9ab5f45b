"""`imagebatch serve` as a user runs it: the command in a subprocess over a data dir that
`imagebatch run` rendered against the fake upstream, looked at in a real browser (Debian's
headless chromium driven by Playwright; `python -m tests` installs chromium when missing)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests import ROOT
from tests.acceptance.test_cli import imagebatch, write

TOKEN_ENV = "IMAGEBATCH_SERVE_TOKEN"
TOKEN = "browser-test-token-0123456789"
HOSTILE = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"
LINES = [
    {"custom_id": "otter", "model": "flux-2-dev", "prompt": "A baby sea otter", "n": 2,
     "aspect_ratio": "1:1", "seed": 7},
    {"custom_id": "markup", "model": "flux-2-klein-4b", "prompt": HOSTILE,
     "fake": {"revised_prompt": "</figcaption><script>window.pwned=3</script>"}},
    {"custom_id": "shanty", "model": "suno-v5", "prompt": "A sea shanty", "style": "folk"},
    {"custom_id": "banana", "model": "nano-banana-pro", "prompt": "A banana spaceship",
     "aspect_ratio": "4:3"},
    {"custom_id": "refused", "model": "flux-2-dev", "prompt": "A refused one",
     "fake": {"status": 422}},
]


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url)
    return environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(env: dict[str, str], *args: str) -> Iterator[str]:
    """`imagebatch serve` in a subprocess until it answers; yields its base URL."""
    port = free_port()
    log = Path(env["IMAGEBATCH_DATA_DIR"]).parent / f"serve-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port),
                                 *args], env=env, cwd=ROOT, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                httpx.get(base + "/static/style.css", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"serve did not answer: {log.read_text()}"
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
    assert TOKEN not in log.read_text()  # nor in its log lines


def chromium_path() -> str:
    found = shutil.which("chromium")
    assert found, ("Debian's chromium is not installed: apt-get install -y chromium "
                   "(python -m tests installs it)")
    return found


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Debian's own chromium: no browser download (the machines reach no CDN). Root needs
        # --no-sandbox.
        launched = playwright.chromium.launch(executable_path=chromium_path(),
                                              args=["--no-sandbox"])
        yield launched
        launched.close()


def screenshots_dir(tmp_path: Path) -> Path:
    """docs/ when SERVE_SCREENSHOTS=docs (how README's pictures are made), else tmp_path."""
    return ROOT / "docs" if os.environ.get("SERVE_SCREENSHOTS") == "docs" else tmp_path


def test_serve_refuses_an_open_address_without_a_token(env):
    for args, extra in ((["--host", "0.0.0.0"], {}),
                        (["--host", "0.0.0.0"], {TOKEN_ENV: "short"}),
                        (["--host", "example.com"], {})):
        result = imagebatch({**env, **extra}, "serve", "--port", str(free_port()), *args,
                            timeout=30)
        assert result.returncode == 2, result.stderr
        assert TOKEN_ENV in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr and "short" not in result.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        busy = imagebatch(env, "serve", "--port", str(taken.getsockname()[1]), timeout=30)
    finally:
        taken.close()
    assert busy.returncode == 2 and "Traceback" not in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1


def test_the_pages_in_a_browser(env, tmp_path, fake, browser):
    result = imagebatch(env, "run", write(tmp_path, *LINES), "--budget", "5", "--team", "lab",
                        "--name", "otters <i>and</i> songs")
    assert result.returncode == 1, result.stderr  # partial: the refused line
    assert imagebatch(env, "team", "set", "lab", "--budget", "20").returncode == 0
    shots = screenshots_dir(tmp_path)
    dialogs: list[str] = []
    with serving(env) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

        # The jobs list, kept current with no reload: a job submitted meanwhile appears.
        page.goto(base + "/")
        row = page.locator("tr[data-job='1']")
        assert "partial" in row.inner_text() and "otters <i>and</i> songs" in row.inner_text()
        assert page.locator("tr[data-job='2']").count() == 0
        page.screenshot(path=str(shots / "serve-jobs.png"))
        submitted = imagebatch(env, "submit", write(tmp_path, LINES[0]), "--budget", "1",
                               "--name", "submitted meanwhile")
        assert submitted.returncode == 0, submitted.stderr
        page.locator("tr[data-job='2']").wait_for(timeout=10_000)
        assert "submitted meanwhile" in page.locator("tr[data-job='2']").inner_text()

        # The gallery: every image decoded, an audio player that loads, the prompt as text.
        page.click("tr[data-job='1'] a >> nth=0")
        page.wait_for_url(base + "/jobs/1")
        page.wait_for_load_state("networkidle")
        widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert len(widths) == 4 and all(w > 0 for w in widths), widths
        audio = page.locator("audio")
        assert audio.count() == 1 and audio.get_attribute("controls") is not None
        page.wait_for_function("document.querySelector('audio').readyState >= 1")
        markup = page.locator("figure", has_text="markup")
        assert markup.locator(".prompt").inner_text() == HOSTILE
        assert "window.pwned=3" in markup.locator(".revised").inner_text()
        assert page.evaluate("window.pwned") is None and dialogs == []
        page.screenshot(path=str(shots / "serve-gallery.png"), full_page=True)

        # A click shows the whole file.
        with page.expect_popup() as popup:
            page.locator("figure", has_text="otter").first.locator("img").click()
        whole = popup.value
        whole.wait_for_load_state()
        assert whole.evaluate("document.images[0].naturalWidth") > 0

        # Failed items with their reason, and the model filter.
        page.select_option("select[name=status]", "failed")
        page.click("button[type=submit]")
        assert "HTTP 422" in page.locator("tr.item", has_text="refused").inner_text()
        page.goto(base + "/jobs/1?model=suno-v5")
        assert page.locator("figure").count() == 1 and page.locator("audio").count() == 1

        # Spend: the team's budget and the charts.
        page.goto(base + "/spend")
        assert "$20.00" in page.locator("table.teams").inner_text()
        assert page.locator("#chart-team rect").count() >= 1
        assert page.locator("#chart-model rect").count() >= 3  # flux, klein, suno, banana
        page.screenshot(path=str(shots / "serve-spend.png"), full_page=True)

        # Nothing outside the storage root, however the path is spelled.
        for path in ("/media/..%2f..%2f..%2fetc%2fpasswd", "/static/..%2f..%2fcli.py",
                     "/media/%2e%2e/%2e%2e/etc/passwd", "/static/%2e%2e/app.py"):
            answer = page.request.get(base + path)
            assert answer.status in (403, 404), path
            assert "root:" not in answer.text() and "import" not in answer.text()
    for name in ("serve-jobs.png", "serve-gallery.png", "serve-spend.png"):
        assert (shots / name).read_bytes().startswith(b"\x89PNG")


def test_the_token_rule_in_a_browser(env, tmp_path, fake, browser):
    assert imagebatch(env, "run", write(tmp_path, LINES[0]), "--budget", "1").returncode == 0
    with serving({**env, TOKEN_ENV: TOKEN}, "--host", "127.0.0.1") as base:
        page = browser.new_page()
        page.goto(base + "/jobs/1")
        assert page.url == base + "/login"  # no page, no file, without the token
        assert page.request.get(base + "/media/1").status == 401
        page.fill("input[name=token]", TOKEN + "-wrong")
        page.click("button[type=submit]")
        assert "not the token" in page.content()
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        assert page.locator("tr[data-job='1']").count() == 1
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
        page.goto(base + "/jobs/1")
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.images[0].naturalWidth") > 0
        assert TOKEN not in page.content()
        # Another browser (no cookie) is still refused.
        other = browser.new_context().new_page()
        other.goto(base + "/spend")
        assert other.url == base + "/login"
