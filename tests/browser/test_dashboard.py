"""The dashboard end to end in chromium: key, create through the form, the row appears, the
job page's loss curve gains points while it trains (one per metrics event at the end), its
prompt box answers what POST /v1/completions answers, a second job cancelled with the
button; a screenshot of the job page kept as an artifact.
Then a learning-rate sweep of three jobs picked on the list and overlaid in the compare view
(the screenshot in docs/ is this test's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.workers.test_integrations import offline_run

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


@pytest.fixture(scope="module")
def key(server: LorafleetServer) -> str:
    key = create_key(server)
    server.api_key = key
    return key


def test_the_dashboard_creates_follows_and_cancels_jobs(
    server: LorafleetServer, key: str, browser: Any, tmp_path: Path
) -> None:
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
    # The prompt box: the fine-tuned model's greedy completion, as POST /v1/completions has it.
    page.wait_for_selector("#try:not([hidden])")
    # Once the job has its model, the box offers it first (the page's next refresh).
    page.wait_for_function(
        "document.getElementById('try-model').value.startsWith('ft:')", timeout=60_000
    )
    fine_tuned = page.input_value("#try-model")
    assert fine_tuned.startswith("ft:tiny-llama:")
    page.fill("#try-prompt", "1+2=")
    page.fill("#try-max-tokens", "6")
    page.click("#try-send")
    page.wait_for_selector("#try-answer.answer:not(.waiting):not([hidden])", timeout=120_000)
    request = {"model": fine_tuned, "prompt": "1+2=", "max_tokens": 6, "temperature": 0}
    with server.api() as api:
        answered = api.http.post("/v1/completions", json=request)
    assert answered.status_code == 200, answered.text
    assert page.inner_text("#try-answer") == answered.json()["choices"][0]["text"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-job-page.png"), full_page=True)

    with server.api() as api:
        file_id = api.upload_file(training)["id"]
        second = api.create_job(
            {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 50}}
        )
    page.goto(f"{server.url}/jobs/{second['id']}")
    page.wait_for_selector("#job-status")
    # Pause shows while it runs, Resume once it is paused (OpenAI's statuses).
    status = "document.getElementById('job-status')?.textContent"
    # While it runs, the job object's estimated_finish is shown ("14:32:05 (in 3 min)").
    finish = page.wait_for_selector("#job-estimated-finish", timeout=400_000)
    assert finish is not None and re.search(r"\d:\d\d .*\(", finish.inner_text())
    page.click("#pause:visible", timeout=400_000)
    page.wait_for_function(f"{status} === 'paused'", timeout=400_000)
    assert page.locator("#pause").is_hidden()
    page.click("#resume:visible")
    page.wait_for_function(f"['queued', 'running'].includes({status})")
    page.wait_for_selector("#pause:visible", timeout=400_000)
    with server.api() as api:
        messages = [e["message"] for e in api.events(second["id"])]
    assert any("paus" in m.lower() for m in messages), messages
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


# Every <text> of each chart's SVG inside the SVG's box on screen: tick labels and axis titles are
# not cut off (before, a label such as 1.0e-3 ran past the left edge of the lr chart).
CLIPPED_LABELS = """(selector) => {
  const svgs = [...document.querySelectorAll(selector + ' svg')];
  return svgs.flatMap((svg) => {
    const box = svg.getBoundingClientRect();
    return [...svg.querySelectorAll('text')].filter((text) => {
      const b = text.getBoundingClientRect();  // on screen: rotation included
      return b.left < box.left || b.top < box.top || b.right > box.right || b.bottom > box.bottom;
    }).map((text) => text.textContent);
  });
}"""


def wandb_losses(folder: Path, job_id: str) -> dict[int, float] | None:
    """Step -> train_loss in the job's offline W&B run (project and name as requested)."""
    found = list(folder.glob(f"*/wandb/offline-run-*-{job_id}-*"))
    if len(found) != 1:
        return None
    run, history = offline_run(found[0])
    assert (run.project, run.display_name) == ("sweep", job_id)
    return {row["_step"]: row["train_loss"] for row in history if "train_loss" in row}


SWEEP = {"lr-1e-3": 1e-3, "lr-3e-3": 3e-3, "lr-1e-2": 1e-2}


def test_the_compare_view_overlays_a_learning_rate_sweep(
    server: LorafleetServer, key: str, browser: Any, tmp_path: Path
) -> None:
    training, validation = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    training.write_text("\n".join(json.dumps(r) for r in DATA))
    validation.write_text("\n".join(json.dumps(r) for r in DATA[::3]))
    with server.api() as api:
        files = [api.upload_file(path)["id"] for path in (training, validation)]
        jobs = {
            suffix: api.create_job(
                {
                    "model": "tiny-llama",
                    "training_file": files[0],
                    "validation_file": files[1],
                    "suffix": suffix,
                    "hyperparameters": {"n_epochs": 2, "batch_size": 2},
                    "training": {"learning_rate": lr},
                    "integrations": [
                        {"type": "wandb", "wandb": {"project": "sweep", "tags": [suffix]}}
                    ],
                }
            )["id"]
            for suffix, lr in SWEEP.items()
        }
    with server.api() as api:
        for job_id in jobs.values():
            assert server.wait_until_terminal(api.http, job_id)["status"] == "succeeded"
        metrics = {
            job_id: [e["data"] for e in api.events(job_id) if e["type"] == "metrics"]
            for job_id in jobs.values()
        }
    # Each job's metrics also went to its Weights & Biases run (offline, under the data dir;
    # the run is complete once the job has left its host).
    wandb_runs = Path(server.env["LORAFLEET_DATA_DIR"]) / "wandb"
    for suffix, job_id in jobs.items():
        steps = {m["step"]: m["train_loss"] for m in metrics[job_id] if "evaluation" not in m}
        wait_for_condition(
            lambda job_id=job_id, steps=steps: wandb_losses(wandb_runs, job_id) == steps,
            timeout=60,
            what=f"{suffix}'s W&B run to hold its 12 steps",
        )
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    page.fill("#api-key", key)  # each page is a fresh browser context: no stored key
    page.click("#key-form button")
    for job_id in jobs.values():
        page.check(f"#jobs input.pick[value='{job_id}']")
    page.click("#compare")
    page.wait_for_url(re.compile(r"/compare\?jobs=ftjob-"))
    page.wait_for_selector("#compare-legend li")

    for suffix, job_id in jobs.items():
        train = page.locator(f"#compare-chart circle[data-series='{job_id}:train']").count()
        valid = page.locator(f"#compare-chart circle[data-series='{job_id}:valid']").count()
        # An evaluation's metrics event repeats its step's train_loss: not a second point.
        steps = [m for m in metrics[job_id] if "evaluation" not in m]
        assert (train, len(steps)) == (len(steps), 12)
        assert valid == len([m for m in metrics[job_id] if m.get("valid_loss") is not None])
        legend = page.locator(f"#compare-legend li[data-job-id='{job_id}']").inner_text()
        assert suffix in legend and f"lr {SWEEP[suffix]:g}" in legend
    # A sweep worth comparing: over the second epoch, the highest learning rate's mean train
    # loss is below the lowest one's on this small set.
    second_epoch = {
        suffix: sum(m["train_loss"] for m in steps[-6:]) / 6
        for suffix, job_id in jobs.items()
        if (steps := [m for m in metrics[job_id] if "evaluation" not in m])
    }
    assert second_epoch["lr-1e-2"] < second_epoch["lr-1e-3"], second_epoch
    # Three curves, one colour each.
    colors = page.eval_on_selector_all(
        "#compare-chart path[data-series$=':train']", "ps => ps.map(p => p.getAttribute('stroke'))"
    )
    assert len(set(colors)) == 3
    assert page.evaluate(CLIPPED_LABELS, "#compare-chart") == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)

    # The job page of the smallest learning rate: its lr chart's labels (1e-3) fit too.
    page.goto(f"{server.url}/jobs/{jobs['lr-1e-3']}")
    page.wait_for_function("document.querySelectorAll('#lr-chart circle').length === 12")
    assert page.evaluate(CLIPPED_LABELS, "#job-view") == []
    assert page.locator("#pause").is_hidden() and page.locator("#resume").is_hidden()
    page.close()
