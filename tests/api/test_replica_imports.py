"""An API replica (`serve --no-scheduler`) never loads the training stack, on any route.

Runs in a fresh interpreter so `sys.modules` holds only what the app itself imported; every
route of the app is called (new routes are covered without touching this test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TRAINING_STACK = ("torch", "deepspeed", "transformers", "ray", "peft", "accelerate")

EXERCISE = """
import json, sys
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from api.app import create_app

app = create_app(run_scheduler=False)
called = []
with TestClient(app) as client:
    data = b'{"prompt": "1+1=", "completion": "2"}'
    file_id = client.post(
        "/v1/files", files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"}
    ).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    job_id = job.json()["id"]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")  # terminal: a live stream ends
    values = {"job_id": job_id, "file_id": file_id, "model_id": "tiny"}
    bodies = {
        ("POST", "/v1/files"): {
            "files": {"file": ("d.jsonl", data)}, "data": {"purpose": "fine-tune"}
        },
        ("POST", "/v1/fine_tuning/jobs"): {"json": {"model": "tiny", "training_file": file_id}},
    }

    def walk(routes, prefix=""):
        # FastAPI >= 0.165 keeps an included router's routes behind an _IncludedRouter.
        for route in routes:
            if isinstance(route, APIRoute):
                yield from ((m, prefix + route.path) for m in route.methods)
            elif hasattr(route, "original_router"):
                yield from walk(route.original_router.routes, prefix + route.include_context.prefix)

    # Deletions last, so every other route still finds the objects.
    calls = sorted(walk(app.routes), key=lambda c: c[0] == "DELETE")
    for method, path in calls:
        url = path.replace("{model_id:path}", "{model_id}")
        for name, value in values.items():
            url = url.replace("{" + name + "}", value)
        answer = client.request(method, url, **bodies.get((method, path), {}))
        called.append([method, path, answer.status_code])
        if path.endswith("/events"):
            answer = client.get(url, params={"stream": "true"})
            called.append([method, path + "?stream=true", answer.status_code])
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"called": called, "loaded": loaded}))
"""


def test_every_route_of_an_api_replica_runs_without_the_training_stack(
    tmp_path: Path, tiny_base: Path
) -> None:
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny": str(tiny_base)}),
    }
    done = subprocess.run(
        [sys.executable, "-c", EXERCISE, *TRAINING_STACK],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    called = result["called"]
    paths = {path for _, path, _ in called}
    assert {"/v1/files", "/v1/fine_tuning/jobs/{job_id}", "/v1/models", "/healthz"} <= paths
    assert "/v1/fine_tuning/jobs/{job_id}/events?stream=true" in paths
    errors = [c for c in called if c[2] >= 500]
    assert not errors, errors
    assert result["loaded"] == [], f"an API replica loaded {result['loaded']}"
