"""Secrets stay out of what we keep and print: an API base with credentials
(`http://user:PASSWORD@host/v1`) is masked in the models cache, `imagebatch models`, logs and
errors; the API key (and the base's password) echoed back by an upstream, in a revised
prompt or an error message, is redacted before it reaches SQL, logs or exports."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fake_upstream.app import FakeServer
from tests import ROOT

KEY = "sk-air-ECHOED-KEY-0123456789"
USER, PASSWORD = "team", "Pa55-w0rd-SECRET"
FLUX = {"model": "flux-2-dev", "prompt": "an otter"}


def imagebatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def environment(tmp_path: Path, api_base: str, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    env.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=api_base,
               IMAGEBATCH_CONCURRENCY="8", IMAGEBATCH_MAX_ATTEMPTS="1")
    if key:
        env["IMAGEBATCH_API_KEY"] = key
    return env


def assert_nowhere(secrets: list[str], texts: list[str], data_dir: Path) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text, (secret, text[:2000])
        for file in data_dir.rglob("*"):
            if file.is_file():
                assert secret.encode() not in file.read_bytes(), (secret, file)


def echoing_job(tmp_path: Path) -> str:
    path = tmp_path / "jobs.jsonl"
    lines: list[dict[str, Any]] = [
        {**FLUX, "custom_id": "revised", "fake": {"echo_key": True}},
        {**FLUX, "custom_id": "status", "fake": {"echo_key": True, "status": 401}},
        {**FLUX, "custom_id": "event", "fake": {"echo_key": True, "error_event": True}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(path)


def run_and_read_everything(env: dict[str, str], tmp_path: Path) -> tuple[dict, list[str]]:
    ran = imagebatch(env, "-vv", "run", echoing_job(tmp_path), "--budget", "1", "--json")
    job = json.loads(ran.stdout)
    outputs = [ran.stdout, ran.stderr]
    for args in (("export", str(job["id"])), ("export", str(job["id"]), "--format", "csv"),
                 ("status", str(job["id"]), "--json"), ("models",), ("models", "--json"),
                 ("report",)):
        shown = imagebatch(env, *args)
        assert shown.returncode == 0, (args, shown.stderr)
        outputs += [shown.stdout, shown.stderr]
    return job, outputs


def test_an_echoed_api_key_is_stored_nowhere(tmp_path: Path, fake: FakeServer) -> None:
    env = environment(tmp_path, fake.base_url, KEY)
    job, outputs = run_and_read_everything(env, tmp_path)
    assert (job["items_succeeded"], job["items_failed"]) == (1, 2)
    assert fake.requests()[0]["authorization"] is True
    exported = "\n".join(outputs)
    assert "an otter (key: [redacted])" in exported  # the revised prompt, kept, redacted
    assert "fake status 401 (key: [redacted])" in exported
    assert_nowhere([KEY], outputs, tmp_path / "data")


def test_credentials_in_the_api_base_are_masked_everywhere(tmp_path: Path,
                                                           fake: FakeServer) -> None:
    """Sent as Basic auth (no key set), echoed back as base64: neither the password nor its
    Basic form is kept or printed; the base shows as http://team:***@host/v1."""
    base = fake.base_url.replace("http://", f"http://{USER}:{PASSWORD}@")
    env = environment(tmp_path, base, None)
    job, outputs = run_and_read_everything(env, tmp_path)
    assert (job["items_succeeded"], job["items_failed"]) == (1, 2)
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert fake.requests()[0]["authorization"] is True  # the credentials were sent
    assert f"http://{USER}:***@127.0.0.1" in "\n".join(outputs)  # the models table title
    assert_nowhere([PASSWORD, basic], outputs, tmp_path / "data")


def test_a_base_with_credentials_and_a_key_is_refused_clearly(tmp_path: Path,
                                                              fake: FakeServer) -> None:
    """Both would need the one Authorization header: refused (nothing sent, exit 2 for
    `models`), said without the password."""
    base = fake.base_url.replace("http://", f"http://{USER}:{PASSWORD}@")
    listed = imagebatch(environment(tmp_path, base, KEY), "models", "--refresh")
    assert listed.returncode == 2 and "Traceback" not in listed.stderr
    assert "holds credentials and an API key is set" in listed.stderr
    assert PASSWORD not in listed.stderr + listed.stdout
    assert fake.stats()["calls"] == 0
