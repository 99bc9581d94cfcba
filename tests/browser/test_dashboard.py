"""The dashboard end to end in chromium: key, create through the form, the row appears, the
job page's loss curve gains points while it trains (one per metrics event at the end), a
second job cancelled with the button; a screenshot of the job page kept as an artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import LorafleetServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = Path(os.environ.get("LORAFLEET_TEST_ARTIFACTS", "test-artifacts"))
DATA = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]


def create_key(server: LorafleetServer) -> str:
    """A key in the server's own database; from then on every request needs one."""
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "browser"],
        env=server.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1]


def test_the_dashboard_creates_follows_and_cancels_jobs(
    server: LorafleetServer, browser: Any, tmp_path: Path
) -> None:
    key = create_key(server)
    server.api_key = key
    training = tmp_path / "train.jsonl"
    training.write_text("\n".join(json.dumps(r) for r in DATA))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    page.fill("#api-key", key)
    page.click("#key-form button")
    page.wait_for_selector("#model option[value='tiny-llama']", state="attached")

    page.set_input_files("#training-file", str(training))
    page.select_option("#model", "tiny-llama")
    page.fill("#epochs", "3")
    page.fill("#batch-size", "2")
    page.click("#create")
    row = page.wait_for_selector("#jobs tbody tr")
    job_id = row.get_attribute("data-job-id")
    assert job_id and job_id.startswith("ftjob-")

    page.click(f"#jobs a[href='/jobs/{job_id}']")
    page.wait_for_url(f"**/jobs/{job_id}")
    points = "#loss-chart circle[data-series='train']"
    page.wait_for_function(f'document.querySelectorAll("{points}").length >= 1', timeout=400_000)
    first = page.locator(points).count()
    page.wait_for_function(
        "document.getElementById('job-status')?.textContent === 'succeeded'", timeout=400_000
    )
    with server.api() as api:
        metrics = [e for e in api.events(job_id) if e["type"] == "metrics"]
    assert page.locator(points).count() == len(metrics) == 3 * len(DATA) // 2
    assert first < len(metrics), "the curve should gain points while the job trains"
    page.wait_for_selector("#checkpoints tbody tr")  # the final adapter, with its metrics
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-job-page.png"), full_page=True)

    with server.api() as api:
        file_id = api.upload_file(training)["id"]
        second = api.create_job(
            {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 50}}
        )
    page.goto(f"{server.url}/jobs/{second['id']}")
    page.wait_for_selector("#job-status")
    page.click("#cancel")
    # A running job shows `cancelling` at once, then `cancelled` once its run has stopped
    # (which waits for the run's workers on a loaded machine).
    page.wait_for_function(
        "['cancelling', 'cancelled'].includes(document.getElementById('job-status')?.textContent)"
    )
    page.wait_for_function(
        "document.getElementById('job-status')?.textContent === 'cancelled'", timeout=400_000
    )
    page.goto(server.url + "/")
    page.wait_for_selector(f"#jobs tr[data-job-id='{second['id']}'] .status-cancelled")
    page.close()
