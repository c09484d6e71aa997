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


def test_slot_writes_place_each_adapter_and_clear_what_it_leaves(llama_dir, adapter_factory):
    """A slot that held a rank-64 adapter on every projection, rewritten with a rank-8 one
    on q/v only: q/v rows hold the new A and B (B scaled), their columns past rank 8 and
    every other projection of the slot are zero, and the other slot is untouched."""
    from lorafleet.worker import LLM

    by_name = {spec.name: req for spec, req in adapter_factory(llama_dir)}
    llm = LLM(str(llama_dir), max_loras=2, max_lora_rank=64)
    am = llm.engine.adapters
    big, small = am.load(by_name["r64"]), am.load(by_name["r8_qv"])
    storage = big.flat.untyped_storage().data_ptr()  # one buffer: one copy per slot load
    assert all(t.untyped_storage().data_ptr() == storage for p in big.weights.values() for t in p)
    am._write_slot(0, 1, big)
    am._write_slot(1, 2, big)
    slot1 = {
        key: (lin.lora_as[i][1].clone(), lin.lora_bs[i][1].clone())
        for key, (lin, i) in am.linears.items()
    }
    am._write_slot(0, 3, small)
    targeted = {id(am.linears[key][0]) for key in small.weights}
    for key, (linear, index) in am.linears.items():
        assert bool(linear.slot_mask & 1) == (id(linear) in targeted), key
        assert linear.slot_mask & 2, key
        a, b = linear.lora_as[index][0], linear.lora_bs[index][0]
        pair = small.weights.get(key)
        if pair is None:
            assert not a.any() and not b.any(), key
        else:
            assert torch.equal(a[:8], pair[0]) and torch.equal(b[:, :8], pair[1]), key
            assert not a[8:].any() and not b[:, 8:].any(), key
        assert torch.equal(linear.lora_as[index][1], slot1[key][0]), key
        assert torch.equal(linear.lora_bs[index][1], slot1[key][1]), key
