"""jobs.settings as version 2 of the typed job settings (core/job_settings.py): OpenAI's
hyperparameters are no longer stored beside `training` (which held two of them already),
`training.learning_rate_multiplier` joins it, and the dict says its `version`

Revision ID: 0009
Revises: 0008
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("settings", sa.JSON))


def _rewrite(change: Any) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.settings)).all()
    for job_id, settings in rows:
        new = change(dict(settings or {}))
        if new != settings:
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(settings=new))


def upgrade() -> None:
    # The upgrade rule itself, as of this revision (a migration must not change later).
    def to_v2(data: dict[str, Any]) -> dict[str, Any]:
        if data.get("version", 1) != 1:
            return data
        hyperparameters = data.pop("hyperparameters", None) or {}
        training = dict(data.get("training") or {})
        training.setdefault(
            "learning_rate_multiplier", hyperparameters.get("learning_rate_multiplier", 1.0)
        )
        training.pop("seed", None)
        return {**data, "training": training, "version": 2}

    _rewrite(to_v2)


def downgrade() -> None:
    def to_v1(data: dict[str, Any]) -> dict[str, Any]:
        if data.get("version") != 2:
            return data
        training = dict(data.get("training") or {})
        multiplier = training.pop("learning_rate_multiplier", 1.0)
        data = {k: v for k, v in data.items() if k != "version"}
        data["hyperparameters"] = {
            "n_epochs": training.get("n_epochs"),
            "batch_size": training.get("batch_size"),
            "learning_rate_multiplier": multiplier,
        }
        return {**data, "training": training}

    _rewrite(to_v1)
