"""Bad input gets a clear, typed error naming the problem; other requests are unaffected."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.producer.errors import (
    AdapterConflictError,
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterPathForbiddenError,
    AdapterRankTooLargeError,
    LoraFleetError,
    PromptTooLongError,
)
from lorafleet.worker import LLM
from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.process.async_engine import AsyncEngine

GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lora_int_id=0), "lora_int_id must be > 0"),
        (dict(lora_int_id=-3), "lora_int_id must be > 0"),
        (dict(lora_path=""), "lora_path cannot be empty"),
        (dict(lora_name=""), "lora_name cannot be empty"),
    ],
)
def test_invalid_lora_request(kwargs, match):
    args = dict(lora_name="a", lora_int_id=1, lora_path="/x") | kwargs
    with pytest.raises(ValueError, match=match):
        LoRARequest(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(temperature=-0.5), "temperature must be"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop strings"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, llama_dir) -> dict[str, tuple[LoRARequest, type]]:
    """name -> (request, expected error type), one per kind of broken adapter."""
    root = tmp_path_factory.mktemp("bad")
    made: dict[str, tuple[LoRARequest, type]] = {}

    def add(name: str, path: Path, err: type) -> None:
        made[name] = (LoRARequest(name, 100 + len(made), str(path)), err)

    add("missing", root / "does-not-exist", AdapterNotFoundError)
    pickled = build_random_adapter(llama_dir, root / "pickled", rank=4)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    add("pickled", pickled, AdapterInvalidError)
    corrupt = build_random_adapter(llama_dir, root / "corrupt", rank=4)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage-not-json")
    add("corrupt", corrupt, AdapterInvalidError)
    add("rank", build_random_adapter(llama_dir, root / "rank", rank=32), AdapterRankTooLargeError)
    lacks = build_random_adapter(llama_dir, root / "lacks", rank=4)
    cfg = json.loads((lacks / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (lacks / "adapter_config.json").write_text(json.dumps(cfg))
    add("lacks", lacks, AdapterInvalidError)
    other_model = build_random_model(root / "other-model", "llama", hidden_size=96)
    add("shapes", build_random_adapter(other_model, root / "shapes", rank=4), AdapterInvalidError)
    good = build_random_adapter(llama_dir, root / "good", rank=4)
    made["base_name"] = (
        LoRARequest("base_name", 120, str(good), base_model_name="meta-llama/Llama-3-70B"),
        AdapterInvalidError,
    )
    return made


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, llama_dir) -> LoRARequest:
    path = build_random_adapter(llama_dir, tmp_path_factory.mktemp("good") / "a", rank=8)
    return LoRARequest("good", 1, str(path))


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), max_loras=2, max_lora_rank=16, max_model_len=64)


BAD_KINDS = ["missing", "pickled", "corrupt", "rank", "lacks", "shapes", "base_name"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_adapter_in_generate(kind, bad_adapters, good_adapter, llm):
    req, err = bad_adapters[kind]
    prompts = ["alpha", "beta", "gamma"]
    expected = llm.generate(prompts, GREEDY, [None, good_adapter, None])
    with pytest.raises(err) as info:
        llm.generate(prompts, GREEDY, [None, req, good_adapter])
    assert req.lora_name in str(info.value)
    assert info.value.code == err.code
    # Nothing leaked; the same engine still serves the good requests identically.
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    again = llm.generate(prompts, GREEDY, [None, good_adapter, None])
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]


def test_pickle_is_never_unpickled(bad_adapters, llm, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.load must never run on an adapter")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(AdapterInvalidError, match="pickle"):
        llm.generate("x", GREEDY, bad_adapters["pickled"][0])


def test_same_id_other_path_is_rejected(good_adapter, llm, tmp_path, llama_dir):
    llm.generate("x", GREEDY, good_adapter)
    other = build_random_adapter(llama_dir, tmp_path / "other", rank=4)
    impostor = LoRARequest(good_adapter.lora_name, good_adapter.lora_int_id, str(other))
    with pytest.raises(AdapterConflictError, match="already bound"):
        llm.generate("x", GREEDY, impostor)
    renamed = LoRARequest("other-name", good_adapter.lora_int_id, good_adapter.lora_path)
    with pytest.raises(AdapterConflictError):
        llm.generate("x", GREEDY, renamed)


def test_prompt_too_long(llm):
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        llm.generate(["ok", "x" * 200], GREEDY)
    assert llm.generate("ok", GREEDY)[0].finished


def test_lora_list_length_mismatch(llm, good_adapter):
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        llm.generate(["a", "b", "c"], GREEDY, [good_adapter, None])


def test_adapter_roots_confine_paths(llama_dir, tmp_path, good_adapter):
    root = tmp_path / "root"
    inside = build_random_adapter(llama_dir, root / "inside", rank=4)
    escape = root / "escape"
    escape.symlink_to(Path(good_adapter.lora_path), target_is_directory=True)
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=16, adapter_roots=(str(root),))
    assert llm.generate("x", GREEDY, LoRARequest("in", 1, str(inside)))[0].finished
    with pytest.raises(AdapterPathForbiddenError, match="outside the allowed adapter roots"):
        llm.generate("x", GREEDY, LoRARequest("esc", 2, str(escape)))
    with pytest.raises(AdapterPathForbiddenError):
        llm.generate("x", GREEDY, LoRARequest("dots", 3, str(root / ".." / "elsewhere")))


def test_hub_id_without_download_is_clear(llm):
    with pytest.raises(AdapterNotFoundError, match="hub is disabled"):
        llm.generate("x", GREEDY, LoRARequest("hub", 77, "some-org/some-adapter"))


def test_async_engine_bad_adapter_fails_alone(llama_dir, bad_adapters, good_adapter):
    """In one running batch, bad adapters fail with typed errors; the rest complete."""
    expected = LLM(str(llama_dir), max_loras=2, max_lora_rank=16).generate(
        ["p0", "p1", "p2"], GREEDY, [None, good_adapter, good_adapter]
    )

    async def run():
        engine = AsyncEngine(EngineConfig(model=str(llama_dir), max_loras=2, max_lora_rank=16))
        await engine.start()
        try:
            good = [
                engine.add_request("g0", "p0", GREEDY, None),
                engine.add_request("g1", "p1", GREEDY, good_adapter),
            ]
            bad = [
                engine.add_request(f"b{i}", "p1", GREEDY, bad_adapters[k][0])
                for i, k in enumerate(["missing", "corrupt", "rank", "shapes"])
            ]
            good.append(engine.add_request("g2", "p2", GREEDY, good_adapter))
            results = await asyncio.gather(
                *(s.result() for s in good + bad), return_exceptions=True
            )
            return results
        finally:
            await engine.stop()

    results = asyncio.run(run())
    got, errors = results[:3], results[3:]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert [type(e) for e in errors] == [
        AdapterNotFoundError,
        AdapterInvalidError,
        AdapterRankTooLargeError,
        AdapterInvalidError,
    ]
    assert all(isinstance(e, LoraFleetError) and e.code for e in errors)


def test_adapter_deleted_after_caching_still_errors_cleanly(llama_dir, tmp_path):
    path = build_random_adapter(llama_dir, tmp_path / "gone", rank=4)
    llm = LLM(str(llama_dir), max_loras=1, max_cpu_loras=1, max_lora_rank=16)
    req = LoRARequest("gone", 5, str(path))
    llm.generate("x", GREEDY, req)
    other = build_random_adapter(llama_dir, tmp_path / "other", rank=4)
    llm.generate("x", GREEDY, LoRARequest("other", 6, str(other)))  # evicts "gone" everywhere
    shutil.rmtree(path)
    with pytest.raises(AdapterNotFoundError, match="gone"):
        llm.generate("x", GREEDY, req)


def test_safetensors_with_wrong_keys(llama_dir, tmp_path):
    folder = build_random_adapter(llama_dir, tmp_path / "emb", rank=4)
    save_file(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)},
        str(folder / "adapter_model.safetensors"),
    )
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=16)
    with pytest.raises(AdapterInvalidError, match="unsupported tensor"):
        llm.generate("x", GREEDY, LoRARequest("emb", 9, str(folder)))
