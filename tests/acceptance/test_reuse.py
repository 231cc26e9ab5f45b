"""Seeded reuse from the command line (issue 19 item 2): `imagebatch run` of a seeded file a
second time copies instead of paying, `report` shows what was reused and saved, `export`
names where each copy came from, and `--no-reuse` (run and submit) pays again."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT
from tests.acceptance.test_cli import SECRET, imagebatch, wait_for_status, write

SEEDED = [{"custom_id": "otters", "model": "flux-2-dev", "prompt": "sea otters", "n": 5,
           "seed": 42, "metadata": {"split": "train"}},
          {"custom_id": "song", "model": "suno-v5", "prompt": "a song", "seed": 3}]
UNSEEDED = {"custom_id": "heron", "model": "flux-2-dev", "prompt": "a heron"}
PAID = 5 * 3 + 5 + 3  # 5 otters at 3 cents, the song at 5, the heron at 3


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url,
                   IMAGEBATCH_API_KEY=SECRET, IMAGEBATCH_CONCURRENCY="16")
    return environ


def run(env, jobs: str, *options: str) -> dict:
    result = imagebatch(env, "run", jobs, "--budget", "1.00", "--json", *options)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    return json.loads(result.stdout)


def test_run_twice_copies_the_seeded_lines_and_report_shows_the_saving(env, tmp_path, fake):
    jobs = write(tmp_path, *SEEDED, UNSEEDED)
    first = run(env, jobs)
    assert (first["status"], first["images"], first["spent_cents"]) == ("succeeded", 7, PAID)
    calls = fake.stats()["calls"]
    assert calls == 4  # otters 4 + 1, the song, the heron

    second = run(env, jobs)
    assert (second["status"], second["images"], second["items_succeeded"]) == (
        "succeeded", 7, 3)
    assert second["spent_cents"] == 3  # the unseeded heron only: it is meant to differ
    assert fake.stats()["calls"] == calls + 1
    assert fake.stats()["billed_cents"] == PAID + 3

    report = json.loads(imagebatch(env, "report", "--job", str(second["id"]), "--json").stdout)
    total = report["total"]
    assert (total["calls"], total["images"], total["charged_cents"]) == (1, 1, 3)
    # 5 otters and the song, saved at what the first job paid for them.
    assert (total["reused_images"], total["saved_cents"]) == (6, PAID - 3)
    table = imagebatch(env, "report")
    assert table.returncode == 0 and "reused" in table.stdout and "saved" in table.stdout
    assert "$0.20" in table.stdout  # what job 2 saved, in the total row
    csv_report = imagebatch(env, "report", "--format", "csv").stdout
    assert csv_report.splitlines()[0].endswith("reused_images,saved_cents,spent_cents,"
                                               "avg_cents_per_image")

    old = {(r["custom_id"], r["render"], r["index"]): r for r in csv.DictReader(io.StringIO(
        imagebatch(env, "export", str(first["id"]), "--format", "csv").stdout))}
    rows = list(csv.DictReader(io.StringIO(
        imagebatch(env, "export", str(second["id"]), "--format", "csv").stdout)))
    assert len(rows) == 7
    for row in rows:
        original = old[(row["custom_id"], row["render"], row["index"])]
        if row["custom_id"] == "heron":
            assert row["reused_from"] == "" and row["cost_cents"] == "3"
            continue
        assert row["reused_from"] == original["uri"] != row["uri"]
        assert row["sha256"] == original["sha256"] and row["cost_cents"] == "0"
        assert (Path(row["uri"].removeprefix("file://")).read_bytes()
                == Path(original["uri"].removeprefix("file://")).read_bytes())


def test_no_reuse_on_run_and_submit_pays_again(env, tmp_path, fake):
    jobs = write(tmp_path, *SEEDED)
    run(env, jobs)
    again = run(env, jobs, "--no-reuse")
    assert again["spent_cents"] == PAID - 3 and fake.stats()["calls"] == 6

    submitted = imagebatch(env, "submit", jobs, "--budget", "1", "--no-reuse", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for_status(env, job_id, "succeeded")
        assert (job["status"], job["spent_cents"]) == ("succeeded", PAID - 3), job
        assert fake.stats()["calls"] == 9
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    help_text = imagebatch(env, "run", "--help").stdout
    assert "--no-reuse" in help_text
