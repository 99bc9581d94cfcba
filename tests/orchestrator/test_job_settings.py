"""A job's typed settings (core/job_settings.py): defaults once, every stored version read,
rows of version 1 rewritten by migration 0009 on SQLite and PostgreSQL (and back)."""

from __future__ import annotations

import json

import pytest
from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy import text

from core.job_settings import SETTINGS_VERSION, JobSettings
from orchestrator.db import MIGRATIONS, make_engine

# As version 1 stored it (lorafleet before migration 0009).
V1 = {
    "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
    "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "training": {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-4,
        "warmup_steps": 0,
        "gradient_clip": 1.0,
        "max_seq_len": 256,
        "weight_decay": 0.0,
        "precision": None,
    },
    "resources": {"num_workers": 2, "use_gpu": None},
    "packing": False,
    "from_checkpoint": {"checkpoint": "ftckpt-a-3", "adapter_prefix": "runs/t/a/x/"},
}


def test_a_version_1_dict_reads_as_the_current_settings() -> None:
    settings = JobSettings.stored(V1)
    assert settings.version == SETTINGS_VERSION
    assert settings.training.learning_rate_multiplier == 0.5
    assert settings.training.learning_rate == 1e-4 and settings.training.batch_size == 8
    assert settings.lora.target_modules == ("q_proj", "v_proj")
    assert settings.packing is False and settings.from_checkpoint is not None
    assert settings.from_checkpoint.adapter_prefix == "runs/t/a/x/"
    # And it round-trips through what a row stores.
    assert JobSettings.stored(settings.to_stored()) == settings


def test_defaults_are_defined_once_and_unknown_fields_are_refused() -> None:
    settings = JobSettings()
    assert (settings.lora.r, settings.training.learning_rate, settings.training.n_epochs) == (
        8,
        2e-4,
        3,
    )
    with pytest.raises(ValidationError, match="no_such"):
        JobSettings.stored({"version": 2, "training": {"no_such": 1}})


def test_launch_resolves_what_depends_on_the_cluster_once() -> None:
    created = JobSettings()
    assert not created.resolved_at_launch
    on_cpu = created.launched(gpu=False)
    assert (on_cpu.resources.use_gpu, on_cpu.training.precision) == (False, "fp32")
    # A resumed attempt keeps what its first launch chose, whatever the cluster has now.
    assert on_cpu.launched(gpu=True) == on_cpu
    asked = JobSettings.stored({"version": 2, "training": {"precision": "bf16"}})
    assert asked.launched(gpu=False).training.precision == "bf16"


def _alembic(connection) -> Config:  # type: ignore[no-untyped-def]
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def test_migration_0009_rewrites_version_1_rows_and_back(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as connection:
        command.upgrade(_alembic(connection), "0008")
        connection.execute(
            text(
                "INSERT INTO jobs (id, tenant, model, training_file, seed, status, attempt,"
                " created_at, settings, event_cursor, priority)"
                " VALUES ('ftjob-old', 't1', 'tiny', 'file-x', 1, 'queued', 0, 1, :s, 0, 0)"
            ),
            {"s": json.dumps(V1)},
        )
    with engine.begin() as connection:
        command.upgrade(_alembic(connection), "0009")
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT settings FROM jobs")).scalar_one()
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored["version"] == 2 and "hyperparameters" not in stored
    assert JobSettings.model_validate(stored) == JobSettings.stored(V1)
    with engine.begin() as connection:
        command.downgrade(_alembic(connection), "0008")
    with engine.connect() as connection:
        back = connection.execute(text("SELECT settings FROM jobs")).scalar_one()
    back = json.loads(back) if isinstance(back, str) else back
    assert back["hyperparameters"] == V1["hyperparameters"] and "version" not in back
