"""`imagebatch export JOB --format hf|webdataset|parquet` in a subprocess, as a user runs it:
the summary, the files it writes, and one-line errors (exit 2) for what cannot be done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests import ROOT
from tests.helpers import s3_environment

API_KEY = "sk-air-TESTSECRET-0123456789abcdef"
AWS_SECRET = "aws-SECRET-never-printed-0123456789"
BUCKET = "imagebatch-cli-exports"
FLUX = {"model": "flux-2-dev", "prompt": "an otter"}


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("IMAGEBATCH_", "AWS_"))}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url,
                   IMAGEBATCH_API_KEY=API_KEY, IMAGEBATCH_CONCURRENCY="16")
    return environ


def imagebatch(env: dict[str, str], *args: str, cwd: Path | str = ROOT
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def run_job(env: dict[str, str], tmp_path: Path) -> int:
    lines = [{**FLUX, "n": 2, "custom_id": "a", "metadata": {"split": "train", "label": "x"}},
             {**FLUX, "custom_id": "b", "metadata": {"split": "test", "label": "y"}},
             {"model": "suno-v5", "prompt": "song", "custom_id": "s"}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = imagebatch(env, "run", str(path), "--budget", "1.00", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["id"]


def test_export_writes_each_dataset_format_and_prints_a_summary(env, tmp_path, fake):
    import pyarrow.parquet as pq

    job = run_job(env, tmp_path)
    hf = imagebatch(env, "export", str(job), "--format", "hf", "-o", str(tmp_path / "hf"),
                    "--json")
    assert hf.returncode == 0, hf.stderr
    assert json.loads(hf.stdout) == {"job": job, "format": "hf",
                                     "destination": str(tmp_path / "hf"), "files": 3,
                                     "skipped": 1, "outputs": 2}
    assert sorted(p.relative_to(tmp_path / "hf").as_posix()
                  for p in (tmp_path / "hf").rglob("metadata.*")) == [
        "test/metadata.parquet", "train/metadata.parquet"]

    wds = imagebatch(env, "export", str(job), "--format", "webdataset", "--shard-size", "3",
                     cwd=tmp_path)  # no -o: ./job-JOB-webdataset
    assert wds.returncode == 0, wds.stderr
    assert f"wrote 4 files to job-{job}-webdataset" in wds.stderr
    assert sorted(p.name for p in (tmp_path / f"job-{job}-webdataset").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar"]

    table = tmp_path / "out" / "files.parquet"
    pqt = imagebatch(env, "export", str(job), "--format", "parquet", "--embed", "-o", str(table))
    assert pqt.returncode == 0, pqt.stderr
    rows = pq.read_table(table).to_pylist()
    assert [(r["custom_id"], r["label"], len(r["content"]) == r["bytes"]) for r in rows] == [
        ("a", "x", True), ("a", "x", True), ("b", "y", True), ("s", None, True)]
    # Each file names the call that made it, as the provider logged it: "a"'s two in one call.
    called = {entry["request_id"] for entry in fake.requests()}
    ids = [r["request_id"] for r in rows]
    assert ids[0] == ids[1] and len(set(ids)) == 3 and set(ids) == called
    for result in (hf, wds, pqt):
        assert API_KEY not in result.stdout + result.stderr


def test_export_to_s3_prints_no_aws_secret(env, tmp_path, s3_endpoint):
    job = run_job(env, tmp_path)
    env.update(s3_environment(s3_endpoint, AWS_SECRET))
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="test",
        aws_secret_access_key=AWS_SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    result = imagebatch(env, "export", str(job), "--format", "webdataset", "-o",
                        f"s3://{BUCKET}/run-{job}/", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["destination"] == f"s3://{BUCKET}/run-{job}/"
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"run-{job}/")["Contents"]
    assert [o["Key"] for o in listed] == [f"run-{job}/shard-000000.tar"]
    missing = imagebatch(env, "export", str(job), "--format", "parquet", "-o",
                         "s3://no-such-bucket-here/x/")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: cannot export to s3://no-such-bucket-here/x/: S3 bucket "
        "'no-such-bucket-here' does not exist (create it first)"]
    for output in (result, missing):
        assert AWS_SECRET not in output.stdout + output.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("999", "--format", "hf"), "999"),
    (("{job}", "--format", "hf", "-o", "{file}"), "not a folder"),
    (("{job}", "--format", "webdataset", "-o", "{file}/sub"), "cannot write here"),
    (("{job}", "--format", "webdataset", "--embed"), "--embed: only with --format parquet"),
    (("{job}", "--format", "webdataset", "--shard-size", "0"), "--shard-size"),
    (("{job}", "--format", "tar"), "tar"),
    (("{job}", "--format", "hf", "-o", "{dir}"), "not empty"),
    (("{job}", "--format", "csv", "-o", "{file}/rows.csv"), "a-file: a file, not a folder"),
    (("{job}", "--format", "parquet", "-o", "s3://user:pw@bucket/x/"), "bad S3"),
])
def test_bad_export_requests_are_one_line_and_exit_2(env, tmp_path, args, message):
    job = run_job(env, tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = imagebatch(env, "export", *(a.format(job=job, file=a_file, dir=tmp_path)
                                              for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1 and message in errors[0]  # around it, click's usage lines at most
    assert "pw@" not in result.stderr


def test_without_pyarrow_parquet_and_hf_say_what_to_install(env, tmp_path):
    job = run_job(env, tmp_path)
    missing = tmp_path / "no-pyarrow" / "pyarrow"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(missing.parent), env.get("PYTHONPATH", "")])
    for fmt in ("parquet", "hf"):
        result = imagebatch(env, "export", str(job), "--format", fmt, "-o",
                            str(tmp_path / f"out-{fmt}/"))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (f"error: --format {fmt} needs pyarrow: pip install "
                                         "'imagebatch[datasets]' (or pip install pyarrow)")
