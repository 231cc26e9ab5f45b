"""Bad values in job files, budgets and caps (issue 16, items 1, 10 and 15), as a user meets
them: `python -m cli` in a subprocess, exit code 2, one line naming where and why, never a
traceback, and nothing written or changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.plan import MAX_CENTS
from tests import ROOT

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3 cents an image
FLUX_LINE = json.dumps(FLUX)


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url)
    return environ


def imagebatch(env: dict[str, str], *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, errors="replace")


def refused(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The one stderr line of a refusal (exit 2, no traceback), holding every `expected`."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def jobs_in(env: dict[str, str]) -> list[dict[str, object]]:
    result = imagebatch(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["jobs"]


# Each: a job line (the file's line 2, after a valid one), and what its error says.
BAD_LINES = {
    "nested 10,000 levels": ("[" * 10_000 + "]" * 10_000, "nested deeper than 64 levels"),
    "nested metadata": (json.dumps({**FLUX, "metadata": {"a": [[[[[[[[1]]]]]]]]}})
                        .replace("[1]", "[" * 80 + "1" + "]" * 80),
                        "nested deeper than 64 levels (in metadata)"),
    "lone surrogate": ('{"model": "flux-2-dev", "prompt": "a \\ud800 b"}',
                       "prompt holds a lone surrogate (\\ud800), which cannot be stored or sent"),
    "surrogate in metadata": ('{"model": "flux-2-dev", "prompt": "p", "metadata": ["\\udfff"]}',
                              "metadata holds a lone surrogate (\\udfff)"),
    "NaN knob": ('{"model": "flux-2-dev", "prompt": "p", "guidance_scale": NaN}',
                 "NaN is not a number a request can carry"),
    "Infinity knob": ('{"model": "flux-2-dev", "prompt": "p", "steps": -Infinity}',
                      "-Infinity is not a number a request can carry"),
    "1e400 knob": ('{"model": "flux-2-dev", "prompt": "p", "strength": 1e400}',
                   "1e400 is too large a number"),
    "seed 2**70": (json.dumps({**FLUX, "seed": 2**70}),
                   "seed must be an integer from 0 to 9223372036854775807, got 1180591620717"),
    "derived seeds past 2**63": (json.dumps({**FLUX, "seed": 2**63 - 2, "n": 4}),
                                 "seed must be an integer from 0 to 9223372036854775804 with n 4"),
    "negative seed": (json.dumps({**FLUX, "seed": -1}), "seed must be an integer from 0"),
    "n 2**64": (json.dumps({**FLUX, "n": 2**64}), "n must be an integer from 1 to 10000"),
    "an integer of 5,000 digits": ('{"model": "flux-2-dev", "prompt": "p", "x": '
                                   + "9" * 5000 + "}", "integer too long to read"),
    "custom_id too long": (json.dumps({**FLUX, "custom_id": "c" * 501}),
                           "custom_id is 501 characters long, more than 500"),
    "custom_id with NUL": (json.dumps({**FLUX, "custom_id": "a\u0000b"}),
                           "custom_id holds a NUL character"),
    "model too long": (json.dumps({**FLUX, "model": "m" * 201}),
                       "model is 201 characters long, more than 200"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_plan_names_the_line_and_why_it_cannot_run(env, tmp_path, case):
    bad, reason = BAD_LINES[case]
    path = tmp_path / "jobs.jsonl"
    path.write_text(f"{FLUX_LINE}\n{bad}\n{FLUX_LINE}\n")
    line = refused(imagebatch(env, "plan", str(path)), f"{path}:2: ", reason)
    assert len(line) < 300  # the value is cut, not echoed whole


@pytest.mark.parametrize("command", ["submit", "run"])
def test_submit_and_run_refuse_every_bad_line_by_number_and_write_nothing(env, tmp_path,
                                                                        command):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([FLUX_LINE, *(bad for bad, _ in BAD_LINES.values())]) + "\n")
    result = imagebatch(env, command, str(path), "--budget", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    errors = result.stderr.strip().splitlines()
    for number, (_, reason) in enumerate(BAD_LINES.values(), start=2):
        assert any(e.startswith(f"{path}:{number}: ") and reason in e for e in errors), reason
    assert f"{len(BAD_LINES)} invalid line(s)" in errors[-1]
    assert "nothing was submitted" in errors[-1]
    assert jobs_in(env) == []


def test_with_allow_invalid_the_bad_lines_fail_and_the_rest_runs(env, tmp_path, fake):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([FLUX_LINE, *(bad for bad, _ in BAD_LINES.values()),
                               FLUX_LINE]) + "\n")
    result = imagebatch(env, "run", str(path), "--budget", "1", "--allow-invalid", "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    job = json.loads(result.stdout)
    assert (job["status"], job["items_succeeded"], job["items_failed"], job["spent_cents"]) == (
        "partial", 2, len(BAD_LINES), 6)
    assert fake.stats()["billed_cents"] == 6


# (command and its arguments before the option, the option, its value, what the error says)
BAD_BUDGETS = [
    (["run", "FILE"], "--budget", "1e309", "more than the largest cap, $1,000,000,000,000.00"),
    (["run", "FILE"], "--budget", "Infinity", "'Infinity' is not an amount in dollars"),
    (["submit", "FILE"], "--budget", "sNaN", "'sNaN' is not an amount in dollars"),
    (["submit", "FILE"], "--budget", "NaN", "'NaN' is not an amount in dollars"),
    (["submit", "FILE"], "--budget", "-1", "'-1' is negative"),
    (["submit", "FILE"], "--budget", "0.001", "not a whole number of cents"),
    (["submit", "FILE"], "--budget-cents", str(10**30), "more than the largest cap"),
    (["submit", "FILE"], "--budget-cents", "NaN", "'NaN' is not a whole number of cents"),
    (["run", "FILE"], "--budget-cents", str(MAX_CENTS + 1), "more than the largest cap"),
    (["team", "set", "data"], "--budget", "1e400", "more than the largest cap"),
    (["team", "set", "data"], "--budget-cents", "-5", "'-5' is negative"),
    (["retry", "1"], "--budget", "inf", "'inf' is not an amount in dollars"),
    (["resume", "1"], "--budget-cents", "1e30", "more than the largest cap"),
    (["schedule", "add", "nightly", "FILE", "--cron", "0 3 * * *"], "--budget", "1e999999999",
     "more than the largest cap"),
]


@pytest.mark.parametrize(("args", "option", "value", "reason"), BAD_BUDGETS,
                         ids=[f"{a[0]} {o} {v[:12]}" for a, o, v, _ in BAD_BUDGETS])
def test_a_budget_that_is_not_an_amount_is_one_line_naming_the_option(env, tmp_path, args,
                                                                      option, value, reason):
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n")
    args = [str(path) if a == "FILE" else a for a in args]
    refused(imagebatch(env, *args, option, value), f"error: {option}: ", reason)
    assert jobs_in(env) == []


BAD_NUMBERS = [
    *([command, "99999999999999999999"] for command in
      ("status", "cancel", "pause", "resume", "retry", "export")),
    ["status", "0"], ["cancel", "abc"],
    ["report", "--job", str(2**31)],
    ["run", "FILE", "--budget", "1", "--concurrency", "99999999999999999999"],
    ["resume", "1", "--concurrency", "0"],
]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=[" ".join(a)[:30] for a in BAD_NUMBERS])
def test_a_job_id_or_count_out_of_range_is_one_line(env, tmp_path, args):
    """A job id of 10**20 reached SQL ("Python int too large to convert to SQLite INTEGER"
    traceback)."""
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n")
    args = [str(path) if a == "FILE" else a for a in args]
    value = args[-1]
    refused(imagebatch(env, *args), f"'{value}' is not a", " from ")
    assert jobs_in(env) == []


def test_a_team_or_name_sql_cannot_store_is_refused(env, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n")
    refused(imagebatch(env, "submit", str(path), "--budget", "1", "--team", b"\xff"),
            "--team holds bytes that are not UTF-8 text")
    refused(imagebatch(env, "submit", str(path), "--budget", "1", "--name", "n" * 501),
            "--name is 501 characters long, more than 500")
    refused(imagebatch(env, "team", "set", "t" * 201, "--budget", "1"),
            "is 201 characters long, more than 200")
    assert jobs_in(env) == []


def test_a_file_name_that_is_not_utf8_names_the_job_with_a_replacement_character(env,
                                                                                 tmp_path):
    path = tmp_path / os.fsdecode(b"\xff-otters.jsonl")
    path.write_text(FLUX_LINE + "\n")
    ran = imagebatch(env, "run", str(path), "--budget", "1", "--json")
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert json.loads(ran.stdout)["name"] == "\ufffd-otters.jsonl"


def test_names_are_printed_as_they_are_never_read_as_markup(env, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n")
    ran = imagebatch(env, "run", str(path), "--budget", "1", "--name", "[/x]", "--team", "[/y]")
    assert ran.returncode == 0, ran.stderr
    listed = imagebatch(env, "status")
    assert listed.returncode == 0 and "[/x]" in listed.stdout and "[/y]" in listed.stdout
    shown = imagebatch(env, "team", "set", "[/y]", "--budget", "1")
    assert shown.returncode == 0 and "team [/y]: $1.00 per month" in shown.stdout
    refused(imagebatch(env, "submit", str(path), "--budget", "[/z]"),
            "'[/z]' is not an amount in dollars")


# --- item 15: retry on a succeeded job; caps below what is spent ------------------------------


def test_retry_on_a_succeeded_job_says_so_and_changes_nothing(env, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n")
    job = json.loads(imagebatch(env, "run", str(path), "--budget", "1", "--json").stdout)
    assert job["status"] == "succeeded"
    for args in (["retry", str(job["id"])], ["retry", str(job["id"]), "--only",
                                             "failed,cancelled,budget,unknown"],
                 ["retry", str(job["id"]), "--budget", "5"]):
        result = imagebatch(env, *args)
        assert result.returncode == 0 and "Traceback" not in result.stderr
        assert f"job {job['id']} is succeeded: nothing to retry" in result.stdout
        assert "nothing was changed" in result.stdout
        after = json.loads(imagebatch(env, "status", str(job["id"]), "--json").stdout)
        after.pop("errors")
        assert after == job  # still succeeded, same cap, same finish time


def test_retry_cannot_set_a_cap_below_what_the_job_spent(env, tmp_path, fake):
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n" + json.dumps({**FLUX, "fake": {"status": 400}}) + "\n")
    job = json.loads(imagebatch(env, "run", str(path), "--budget", "1", "--json").stdout)
    assert (job["status"], job["spent_cents"]) == ("partial", 3)
    refused(imagebatch(env, "retry", str(job["id"]), "--budget-cents", "2"),
            f"job {job['id']}: a cap of $0.02 is below what it has already spent ($0.03",
            "set at least $0.03")
    after = json.loads(imagebatch(env, "status", str(job["id"]), "--json").stdout)
    assert (after["status"], after["budget_cents"], after["finished_at"]) == (
        "partial", 100, job["finished_at"])
    again = imagebatch(env, "retry", str(job["id"]), "--budget-cents", "3")
    assert again.returncode == 0 and "1 failed item(s) queued again" in again.stdout


def test_team_set_cannot_go_below_what_the_period_spent(env, tmp_path, fake):
    assert imagebatch(env, "team", "set", "data", "--budget", "0.05").returncode == 0
    path = tmp_path / "jobs.jsonl"
    path.write_text(FLUX_LINE + "\n")
    job = json.loads(imagebatch(env, "run", str(path), "--team", "data", "--budget", "1",
                                "--json").stdout)
    assert job["spent_cents"] == 3
    refused(imagebatch(env, "team", "set", "data", "--budget", "0.02"),
            "team data: a limit of $0.02 is below what it has spent this month ($0.03",
            "set at least $0.03")
    shown = json.loads(imagebatch(env, "team", "show", "data", "--json").stdout)
    assert (shown["limit_cents"], shown["spent_cents"]) == (5, 3)
    assert imagebatch(env, "team", "set", "data", "--budget", "0.03").returncode == 0
    # Another period is another budget, spending from zero: a daily 2 cents is fine.
    assert imagebatch(env, "team", "set", "data", "--budget-cents", "2",
                      "--period", "day").returncode == 0
    assert imagebatch(env, "team", "set", "data", "--no-budget").returncode == 0
