"""A /models catalogue that says things no price can mean, as `imagebatch models` and
`imagebatch plan` show it: the refused models and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fake_upstream.app import FakeServer
from tests import ROOT
from tests.integration import test_catalogue

odd_catalogue = test_catalogue.odd_catalogue  # the fixture: a catalogue of odd models


def test_models_command_shows_refused_models_and_why(tmp_path: Path,
                                                     odd_catalogue: FakeServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    env.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"),
               IMAGEBATCH_API_BASE=odd_catalogue.base_url)
    table = subprocess.run([sys.executable, "-m", "cli", "models"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "refused" in table.stdout and "Traceback" not in table.stderr
    assert "model 'huge' is refused: its price_per_image_cents" in table.stdout
    listed = subprocess.run([sys.executable, "-m", "cli", "models", "--json"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    by_id = {m["model"]: m for m in json.loads(listed.stdout)}
    assert by_id["huge"]["price_per_image_cents"] is None and by_id["huge"]["refused"]
    assert by_id["good"]["refused"] is None
    planned = subprocess.run(
        [sys.executable, "-m", "cli", "plan", "-"], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=120, input=json.dumps({"model": "negative", "prompt": "p"}) + "\n")
    assert planned.returncode == 2 and "Traceback" not in planned.stderr
    assert "model 'negative' is refused" in planned.stderr
