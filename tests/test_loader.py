"""Model folders: sharded checkpoints load; broken or unsupported folders fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_sharded_checkpoint_equals_single_file(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(llama_dir / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    prompts = ["one", "two three"]
    expected = LLM(str(llama_dir), enable_lora=False).generate(prompts, GREEDY)
    got = LLM(str(sharded), enable_lora=False).generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "gpt2ish")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(folder))


def test_pickle_only_checkpoint_is_refused(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        LLM(str(folder))


def test_missing_folder_and_tiny_kv_budget(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        LLM(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        LLM(str(llama_dir), kv_cache_bytes=1024)
