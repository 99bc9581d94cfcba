"""GET …/merged?scale= and DELETE /v1/models/{model} through the API on a local store, with
the scheduler's merge step run in-process (the Ray task is the same function:
tests/e2e/test_merged_over_http.py runs it on Ray)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from api.client import LorafleetClient
from core.merged_files import MergeOutcome, MergeRequest
from core.objectstore import open_object_store
from core.publish import publish_adapter, store_adapter_archive
from orchestrator.api_keys import OPEN_TENANT
from orchestrator.db import make_engine
from orchestrator.merges import MergeScheduling
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.store.merges import merge_store
from tests.api.conftest import GOOD_RECORDS, upload
from tests.conftest import job_row
from workers.runtime.merge_task import merge_to_store

PROMPT = torch.tensor([[1, 5, 9, 42, 7]])


class InlineMerges:
    """A MergeRunner that merges at once, in this process."""

    def __init__(self) -> None:
        self.done: list[MergeOutcome] = []

    def start(self, request: MergeRequest) -> None:
        self.done.append(merge_to_store(request))

    def running(self) -> set[str]:
        return set()

    def finished(self) -> list[MergeOutcome]:
        done, self.done = self.done, []
        return done


def peft_adapter(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def succeeded_job(client: TestClient, adapter: Path, model: str = "ft:tiny::merge") -> str:
    services = client.app.state.services  # type: ignore[attr-defined]
    file_id = upload(client, GOOD_RECORDS)["id"]
    job_id = str(
        client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
        ).json()["id"]
    )
    store = services.store
    store.queue(job_id, "queued")
    job = store.claim(job_id, 0, "run-test", "started")
    publish_adapter(services.objects, job.tenant, job_id, job.attempt, adapter)
    store_adapter_archive(services.objects, job.tenant, job_id, job.attempt)
    store.succeed(job_id, job.attempt, model, "done")
    return job_id


def test_merged_weights_are_queued_merged_listed_and_go_with_the_deleted_model(
    client: TestClient, tiny_base: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    services = client.app.state.services  # type: ignore[attr-defined]
    adapter = peft_adapter(tiny_base, tmp_path / "adapter")
    job_id = succeeded_job(client, adapter)
    url = f"/v1/fine_tuning/jobs/{job_id}/merged"

    first = client.get(url, params={"scale": 0.5})
    assert first.status_code == 202 and first.json()["status"] == "queued", first.text
    assert client.get(url, params={"scale": "0.50"}).json()["status"] == "queued"  # one row
    merges = merge_store(services.store.engine)
    scheduling = MergeScheduling(
        services.settings, services.store, merges, services.objects, InlineMerges()
    )
    scheduling.tick()  # starts (and here finishes) the merge
    scheduling.tick()  # records it

    listed = client.get(url, params={"scale": 0.5})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["status"] == "succeeded" and body["scale"] == 0.5 and body["checkpoint"] == "final"
    folder = tmp_path / "merged"
    folder.mkdir()
    for item in body["files"]:
        data = client.get(item["url"]).content  # a local store: served by the API
        assert len(data) == item["size"] and hashlib.sha256(data).hexdigest() == item["sha256"]
        (folder / item["name"]).write_bytes(data)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter
    )
    for module in reference.modules():
        if hasattr(module, "scale_layer") and hasattr(module, "lora_A"):
            module.scale_layer(0.5)
    with torch.no_grad():
        assert (merged(PROMPT).logits - reference(PROMPT).logits).abs().max().item() <= 1e-4
    stored = sum(item["size"] for item in body["files"])
    assert merges.tenant_storage_bytes(merges.get(job_id, "final", "0.5").tenant) > stored

    deleted = client.delete("/v1/models/ft:tiny::merge")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": "ft:tiny::merge",
        "object": "model",
        "deleted": True,
    }
    for gone in (
        f"/v1/fine_tuning/jobs/{job_id}/adapter",
        f"{url}?scale=0.5",
        body["files"][0]["url"],
    ):
        assert client.get(gone).status_code == 404, gone
    tenant = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["organization_id"]
    for root in ("adapters", "merged", "runs"):
        assert services.objects.list(f"{root}/{tenant}/{job_id}/") == []
    after = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert after["status"] == "succeeded" and after["model_deleted_at"] is not None
    assert "ft:tiny::merge" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.delete("/v1/models/ft:tiny::merge").status_code == 404
    assert client.delete("/v1/models/tiny").status_code == 403  # a base model


def test_bad_scales_and_missing_things_are_4xx_naming_them(
    client: TestClient, tiny_base: Path, tmp_path: Path
) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    job_id = succeeded_job(client, peft_adapter(tiny_base, tmp_path / "adapter"))
    url = f"/v1/fine_tuning/jobs/{job_id}/merged"
    for scale in ("nan", "inf", "-inf", "4.5", "-5", "abc", ""):
        response = client.get(url, params={"scale": scale})
        assert response.status_code == 400, (scale, response.text)
        assert response.json()["error"]["param"] == "scale"
    missing = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/ftckpt-nope-3/merged")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "checkpoint_id"
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/merged").status_code == 404
    queued = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": upload(client, GOOD_RECORDS)["id"]},
    ).json()["id"]
    assert client.get(f"/v1/fine_tuning/jobs/{queued}/merged").status_code == 409
    # Another tenant's model is not this caller's to delete: 404, and it stays.
    theirs = job_row(tenant="someone-else", status="succeeded", fine_tuned_model="ft:tiny::theirs")
    services.store.add_job(theirs, "created")
    assert client.delete("/v1/models/ft:tiny::theirs").status_code == 404
    assert services.store.job(theirs.id).model_deleted_at is None


def test_the_cli_client_waits_and_downloads_a_local_stores_merge_through_the_api(
    settings: Settings, live_server: str, tiny_base: Path, tmp_path: Path
) -> None:
    """`lorafleet jobs download --merged`'s client (api/client.py) over real HTTP: a local
    store's files come through the API, with the API key, each checked against its sha256."""
    from safetensors.torch import load_file

    engine = make_engine(settings.database_url)
    store, objects = JobStore(engine), open_object_store(settings.object_store_config)
    job = job_row(tenant=OPEN_TENANT, status="succeeded", fine_tuned_model="ft:tiny::cli")
    store.add_job(job, "created")
    publish_adapter(objects, job.tenant, job.id, 0, peft_adapter(tiny_base, tmp_path / "a"))
    scheduling = MergeScheduling(settings, store, merge_store(engine), objects, InlineMerges())
    with LorafleetClient(live_server) as api:
        assert api.merged_weights(job.id, 0.5)["status"] == "queued"
        scheduling.tick()
        scheduling.tick()
        seen: list[str] = []
        listing = api.wait_merged(job.id, 0.5, on_status=seen.append)
        assert seen == ["succeeded"] and listing["files"][0]["url"].startswith(live_server)
        got: list[int] = []
        folder = api.download_merged(listing, tmp_path / "merged", on_bytes=got.append)
    assert sum(got) == sum(item["size"] for item in listing["files"])
    assert {p.name for p in folder.iterdir()} == {item["name"] for item in listing["files"]}
    assert load_file(folder / "model.safetensors")  # whole and readable
