"""What `imagebatch submit` prints for bad files and writes for a good one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT
from tests.integration.test_submission import flux, jsonl, write


def test_submit_prints_the_first_100_invalid_lines_and_how_many_more(env, tmp_path):
    lines = [{"model": "flux-2-dev", "prompt": f"p{i}", "custom_id": f"c{i}"}
             for i in range(1, 301)]
    for i in range(1, 301, 2):
        lines[i] = {"model": "flux-2-dev", "custom_id": f"c{i + 1}"}  # 150 lines with no prompt
    path = write(tmp_path, jsonl(*lines))
    result = imagebatch(env, "submit", path, "--budget", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]
    assert len(shown) == 100
    assert shown[0] == f"{path}:2 (c2): missing prompt"
    assert "... and 50 more invalid lines" in result.stderr
    assert "150 invalid line(s)" in result.stderr and "nothing was submitted" in result.stderr
    assert json.loads(imagebatch(env, "status", "--json").stdout) == {"jobs": []}

    planned = json.loads(imagebatch(env, "plan", path, "--json").stdout)
    assert (planned["items"], planned["error_count"], len(planned["errors"])) == (150, 150, 100)
    assert planned["max_cost_cents"] == 150 * 3


def test_submit_of_a_directory_or_an_unreadable_file_is_one_line(env, tmp_path):
    for target in (str(tmp_path), str(tmp_path / "missing.jsonl")):
        result = imagebatch(env, "submit", target, "--budget", "1")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and target in result.stderr
    if os.geteuid() != 0:  # root reads any file
        locked = Path(write(tmp_path, jsonl(flux(1)), "locked.jsonl"))
        locked.chmod(0)
        result = imagebatch(env, "plan", str(locked))
        assert result.returncode == 2 and "cannot be read" in result.stderr


def test_submit_writes_a_pending_job_with_every_line(env, tmp_path):
    path = write(tmp_path, jsonl(*[{"model": "flux-2-dev", "prompt": f"p{i}", "n": 5}
                                   for i in range(12)]))
    result = imagebatch(env, "submit", path, "--budget", "5", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["items_total"] == 12 and job["name"] == "jobs.jsonl"
    assert job["status"] in ("pending", "running")  # a dispatcher may already have planned it


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url)
    return environ


def imagebatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
