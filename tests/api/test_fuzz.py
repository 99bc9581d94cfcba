"""Fuzzing the input checks: no input makes a 500, and every rejection names a line or field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from core.examples import DatasetError, parse_jsonl
from orchestrator.settings import Settings

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                    "content": st.text(max_size=10) | st.integers(),
                    "weight": st.sampled_from([0, 1, 2, True, "1"]),
                },
            ),
            max_size=4,
        )
        | json_values,
        "prompt": st.text(max_size=10) | json_values,
        "completion": st.text(max_size=10) | json_values,
        "text": st.text(max_size=10) | json_values,
    },
)
lines = st.lists(
    st.one_of(
        record_like.map(json.dumps),
        json_values.map(json.dumps),
        st.text(max_size=30),
    ),
    max_size=6,
)


@given(lines)
@settings(max_examples=300, deadline=None)
def test_validation_either_accepts_or_names_the_line_and_field(content: list[str]) -> None:
    data = "\n".join(content).encode()
    try:
        examples = parse_jsonl(data)
    except DatasetError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.line >= 1 and problem.field
            assert str(problem).startswith(f"line {problem.line}: {problem.field}: ")
        return
    assert examples and all(any(s.trained for s in e.segments) for e in examples)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_crash_the_validator(data: bytes) -> None:
    try:
        parse_jsonl(data)
    except DatasetError as exc:
        assert "line " in str(exc)


@pytest.fixture(scope="module")
def module_client(  # type: ignore[no-untyped-def]
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, module_database_url: str
):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        database_url=module_database_url,
        base_models={"tiny": str(tiny_base)},
    )
    with TestClient(create_app(settings)) as client:
        yield client


@given(lines, st.text(max_size=12))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_uploads_never_make_a_server_error(
    module_client: TestClient, content: list[str], purpose: str
) -> None:
    response = module_client.post(
        "/v1/files",
        files={"file": ("f.jsonl", "\n".join(content).encode())},
        data={"purpose": purpose},
    )
    assert response.status_code < 500
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["param"] in ("file", "purpose") and error["message"]


@given(json_values, record_like)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_job_requests_never_make_a_server_error(
    module_client: TestClient, lora: object, extra: dict
) -> None:  # type: ignore[type-arg]
    body = {"model": "tiny", "training_file": "file-x", "lora": lora, **extra}
    response = module_client.post("/v1/fine_tuning/jobs", json=body)
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["param"]
