"""Hostile or mistaken input gets a clear 4xx in the error envelope, checked at submission,
and leaves no traceback in the server log; a bad catalog stops the server from starting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import ServeRefused, create_app
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, MAX_UPLOAD, upload

DEEP = 30_000  # far past the JSON decoder's recursion limit, within the upload limit


def assert_envelope(response: Any, status: int, param: str | None, *words: str) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error  # type: ignore[no-any-return]


def test_an_upload_nested_too_deeply_is_a_400_naming_the_line(client: TestClient) -> None:
    body = b'{"text": "ok"}\n' + b"[" * DEEP + b"]" * DEEP + b"\n"
    assert len(body) < MAX_UPLOAD
    response = client.post(
        "/v1/files", files={"file": ("deep.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert_envelope(response, 400, "file", "line 2", "nested too deeply")
    assert client.get("/v1/files").json()["data"] == []


def test_a_job_body_nested_too_deeply_is_a_400(client: TestClient) -> None:
    body = '{"model": "tiny", "metadata": ' + "[" * DEEP + "]" * DEEP + "}"
    response = client.post(
        "/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def _create(client: TestClient, **fields: Any) -> Any:
    file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, **fields}
    )


@pytest.mark.parametrize(
    "targets",
    [["no_such_proj"], ["__class__"], ["q_proj", "embed_tokens"], ["lm_head"], ["layers"]],
)
def test_target_modules_that_are_not_linear_layers_of_the_base_are_refused(
    client: TestClient, targets: list[str]
) -> None:
    response = _create(client, lora={"target_modules": targets})
    error = assert_envelope(response, 400, "lora.target_modules", "q_proj", "all-linear")
    bad = [t for t in targets if t != "q_proj"]
    assert str(bad) in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], ["down_proj"], ["model.layers.0.self_attn.q_proj"], "all-linear"],
)
def test_target_modules_naming_linear_layers_are_accepted(client: TestClient, targets: Any) -> None:
    response = _create(client, lora={"target_modules": targets})
    assert response.status_code == 200, response.text
    assert response.json()["lora"]["target_modules"] == targets


def _copy_of(tiny_base: Path, folder: Path) -> Path:
    shutil.copytree(tiny_base, folder)
    return folder


def test_a_catalog_entry_whose_folder_is_gone_is_refused_at_submission(
    settings: Settings, tiny_base: Path, tmp_path: Path
) -> None:
    moved = _copy_of(tiny_base, tmp_path / "moved-base")
    settings.base_models = {**settings.base_models, "moved": str(moved)}
    with TestClient(create_app(settings)) as client:
        file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
        shutil.rmtree(moved)
        response = client.post(
            "/v1/fine_tuning/jobs", json={"model": "moved", "training_file": file_id}
        )
        assert_envelope(response, 400, "model", "'moved'", str(moved), "config.json")
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_create_app_refuses_a_catalog_entry_without_a_model_folder(
    settings: Settings, tmp_path: Path
) -> None:
    settings.base_models = {**settings.base_models, "ghost": str(tmp_path / "no-such-model")}
    with pytest.raises(ServeRefused, match="ghost.*no-such-model"):
        create_app(settings)


def test_serve_refuses_to_start_naming_the_entry_and_the_folder(
    tmp_path: Path, tiny_base: Path
) -> None:
    missing = tmp_path / "no-such-model"
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny": str(tiny_base), "ghost": str(missing)}),
    }
    lorafleet = Path(sys.executable).parent / "lorafleet"
    done = subprocess.run(
        [str(lorafleet), "serve", "--no-scheduler", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ghost" in done.stderr and str(missing) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_nul_characters_and_over_long_values_are_400s_on_both_databases(
    client: TestClient,
) -> None:
    """PostgreSQL refuses NUL in text and values past a column's length (a DataError, once
    a 500); each is refused before the database sees it, naming where it was."""
    file_id = upload(client, GOOD_RECORDS)["id"]
    job = {"model": "tiny", "training_file": file_id}
    assert_envelope(client.get("/v1/fine_tuning/jobs/ftjob-%00"), 400, "path")
    assert_envelope(client.get("/v1/files", params={"purpose": "a\x00b"}), 400, "purpose")
    assert_envelope(client.get("/v1/fine_tuning/jobs", params={"after": "\x00"}), 400, "after")
    bad_bodies = [
        ({**job, "training_file": "file-\x00"}, "training_file"),
        ({**job, "validation_file": "\x00"}, "validation_file"),
        ({**job, "from_checkpoint": "ftckpt-\x00-1"}, "from_checkpoint"),
        ({**job, "metadata": {"k": "v\x00"}}, "metadata.k"),
        ({**job, "training_file": "f" * 65}, "training_file"),
    ]
    for body, param in bad_bodies:
        assert_envelope(client.post("/v1/fine_tuning/jobs", json=body), 400, param)
    # (httpx would percent-encode a NUL in a file name: the body is written out.)
    named = client.post(
        "/v1/files",
        content=b"--b\r\nContent-Disposition: form-data; name=purpose\r\n\r\nfine-tune\r\n"
        b'--b\r\nContent-Disposition: form-data; name=file; filename="a\x00.jsonl"\r\n\r\n'
        b'{"text": "a"}\n\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_envelope(named, 400, "file", "NUL")
    too_long = client.post(
        "/v1/files", files={"file": ("a" * 513, b'{"text": "a"}\n')}, data={"purpose": "fine-tune"}
    )
    assert_envelope(too_long, 400, "file", "512")
    hook = client.post("/v1/webhooks", json={"url": "https://example.com/" + "a" * 2100})
    assert_envelope(hook, 400, "url")
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [file_id]
