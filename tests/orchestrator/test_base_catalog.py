"""The catalog's submission checks on a base's own files (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.base_catalog import BaseModelCatalog, CatalogError
from core.objectstore import ObjectStoreConfig


def catalog_of(folder: Path, model_type: str) -> BaseModelCatalog:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return BaseModelCatalog({"base": str(folder)}, ObjectStoreConfig(url=str(folder / "s")))


@pytest.mark.parametrize("targets", ["all-linear", ["c_attn"]])
def test_a_conv1d_base_is_refused_at_submission_naming_the_model(
    tmp_path: Path, targets: str | list[str]
) -> None:
    catalog = catalog_of(tmp_path / "gpt2", "gpt2")
    with pytest.raises(CatalogError) as refused:
        catalog.check_target_modules("base", targets)
    assert refused.value.param == "model"
    assert "gpt2" in refused.value.message and "Conv1D" in refused.value.message


def test_a_linear_base_passes_the_same_check(tmp_path: Path) -> None:
    catalog_of(tmp_path / "llama", "llama").check_target_modules("base", "all-linear")
