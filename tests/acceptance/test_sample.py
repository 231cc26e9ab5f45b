"""`imagebatch run FILE --sample K` as a user runs it: the sample's cost and the projection,
the job left paused with no terminal to ask on, `resume` rendering the rest, `--yes`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.acceptance.test_cli import FLUX, SECRET, imagebatch, write


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    return environ | {"IMAGEBATCH_DATA_DIR": str(tmp_path / "data"),
                      "IMAGEBATCH_API_BASE": fake.base_url, "IMAGEBATCH_API_KEY": SECRET}


def lines(count: int) -> list[dict[str, object]]:
    return [{**FLUX, "custom_id": f"c{i}", "prompt": f"otter {i}"} for i in range(count)]


def test_a_sample_prints_its_cost_and_projection_and_leaves_the_job_paused(env, tmp_path, fake):
    jobs = write(tmp_path, *lines(30))
    result = imagebatch(env, "run", jobs, "--budget", "5", "--sample", "3", "--json")
    assert result.returncode == 1, result.stderr  # paused: not every item succeeded yet
    job = json.loads(result.stdout)
    assert (job["status"], job["items_succeeded"], job["spent_cents"]) == ("paused", 3, 9)
    assert (job["sample_lines"], job["total_lines"], job["projected_cents"]) == (3, 30, 90)
    assert fake.stats()["calls"] == 3
    assert "the whole file would cost about $0.90" in result.stderr
    assert f"imagebatch resume {job['id']}" in result.stderr

    resumed = imagebatch(env, "resume", str(job["id"]), "--json")
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads(resumed.stdout)
    assert (done["status"], done["items_succeeded"], done["spent_cents"]) == ("succeeded", 30, 90)
    assert fake.stats()["calls"] == 30  # the sampled lines were not sent again


def test_the_same_file_samples_the_same_lines(env, tmp_path, fake):
    jobs = write(tmp_path, *lines(50))
    ids = []
    for _ in range(2):
        result = imagebatch(env, "run", jobs, "--budget", "5", "--sample", "4", "--new", "--json")
        ids.append(json.loads(result.stdout)["id"])
    exported = [imagebatch(env, "export", str(job), "--format", "jsonl").stdout for job in ids]
    drawn = [sorted(json.loads(row)["custom_id"] for row in text.splitlines()) for text in exported]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 4


def test_yes_goes_on_to_the_whole_file_without_asking(env, tmp_path, fake):
    result = imagebatch(env, "run", write(tmp_path, *lines(12)), "--budget", "5", "--sample",
                        "2", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert (job["status"], job["items_succeeded"], job["projected_cents"]) == ("succeeded", 12, 36)
    assert job["spent_cents"] == 36 == fake.stats()["billed_cents"]
    assert fake.stats()["calls"] == 12


def test_yes_without_a_sample_is_refused(env, tmp_path):
    result = imagebatch(env, "run", write(tmp_path, *lines(2)), "--budget", "5", "--yes")
    assert result.returncode == 2
    assert "--yes: only with --sample K" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("answer", "status", "calls"),
                         [("y", "succeeded", 10), ("n", "paused", 2)])
def test_on_a_terminal_it_asks_whether_to_go_on(env, tmp_path, fake, answer, status, calls):
    import pty
    import subprocess
    import sys

    from tests.acceptance.test_cli import ROOT

    main, terminal = pty.openpty()
    run = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", write(tmp_path, *lines(10)), "--budget", "5",
         "--sample", "2", "--json"], env=env, cwd=ROOT, stdin=terminal, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    os.close(terminal)
    try:
        os.write(main, f"{answer}\n".encode())  # read once the question is asked
        stdout, stderr = run.communicate(timeout=120)
    finally:
        os.close(main)
    assert "render the other 8 lines? [y/N]" in stderr
    job = json.loads(stdout)
    assert (job["status"], job["projected_cents"]) == (status, 30)
    assert fake.stats()["calls"] == calls
