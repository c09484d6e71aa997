"""What stands between a request and the disk, in process: the negative cache of failed
adapters, hub ids only when configured, no local adapters without configured roots, and odd
paths answered as typed errors instead of killing the engine."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.producer.errors import (
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterPathForbiddenError,
)
from lorafleet.worker import LLM
from lorafleet.worker.adapters import manager as adapter_manager
from lorafleet.worker.demo.synthetic import build_random_adapter

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def good_adapter(llama_dir, tmp_path_factory) -> Path:
    return build_random_adapter(llama_dir, tmp_path_factory.mktemp("guard") / "good", rank=4)


def _broken(folder: Path) -> LoRARequest:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{ not json")
    return LoRARequest("broken", 7, str(folder))


def test_a_failed_adapter_is_read_once_per_ttl(llama_dir, good_adapter, tmp_path, monkeypatch):
    reads = []
    load = adapter_manager.load_peft_adapter
    monkeypatch.setattr(
        adapter_manager, "load_peft_adapter", lambda *a, **k: reads.append(a[1]) or load(*a, **k)
    )
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=16, adapter_failure_ttl=0.5)
    broken = _broken(tmp_path / "broken")
    for _ in range(1000):
        with pytest.raises(AdapterInvalidError, match="adapter 'broken'"):
            llm.engine.adapters.load(broken)
    stats = llm.engine.adapters.stats
    assert reads == ["broken"]
    assert (stats.disk_load_failures, stats.failure_cache_hits) == (1, 999)
    with pytest.raises(AdapterInvalidError, match="remembered; the adapter is retried in"):
        llm.generate("x", GREEDY, broken)  # through the engine too, same answer
    # Fixed on disk: served once the failure has expired, not before.
    shutil.rmtree(broken.lora_path)
    shutil.copytree(good_adapter, broken.lora_path)
    with pytest.raises(AdapterInvalidError):
        llm.engine.adapters.load(broken)
    time.sleep(0.6)
    assert llm.generate("x", GREEDY, broken)[0].finished
    assert reads == ["broken", "broken"]


def test_a_zero_ttl_remembers_nothing(llama_dir, tmp_path):
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=16, adapter_failure_ttl=0)
    broken = _broken(tmp_path / "broken")
    for _ in range(3):
        with pytest.raises(AdapterInvalidError):
            llm.engine.adapters.load(broken)
    assert llm.engine.adapters.stats.disk_load_failures == 3


def test_no_configured_roots_means_no_local_adapters(llama_dir, good_adapter):
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=16, adapter_roots=())
    with pytest.raises(AdapterPathForbiddenError, match="loads no local adapters"):
        llm.generate("x", GREEDY, LoRARequest("good", 1, str(good_adapter)))


def test_odd_paths_are_typed_errors_and_the_engine_lives_on(llama_dir, good_adapter):
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=16)
    for i, path in enumerate(["/tmp/with\x00nul", "/" + "x" * 5000, "/proc/self/mem"], start=1):
        with pytest.raises((AdapterInvalidError, AdapterNotFoundError)):
            llm.generate("x", GREEDY, LoRARequest(f"odd{i}", i, path))
    assert llm.generate("x", GREEDY, LoRARequest("good", 9, str(good_adapter)))[0].finished


def _hub_cache_with(adapter: Path, cache: Path, repo_id: str) -> None:
    """Lay ``adapter`` out in ``cache`` as huggingface_hub stores a downloaded snapshot:
    files are links into ``blobs/``, ``refs/main`` names the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("adapter_config.json", "adapter_model.safetensors")):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(adapter / name, blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))


def test_hub_ids_follow_the_hub_setting(llama_dir, good_adapter, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    _hub_cache_with(good_adapter, cache, "acme/sql-lora")
    cached = LoRARequest("sql", 1, "acme/sql-lora")
    elsewhere = LoRARequest("other", 2, "acme/not-cached")

    def llm(hub: str) -> LLM:
        return LLM(str(llama_dir), max_loras=1, max_lora_rank=16, hub=hub, hub_cache_dir=str(cache))

    with pytest.raises(AdapterNotFoundError, match=r"adapter 'sql'.*hub is disabled"):
        llm("off").generate("x", GREEDY, cached)
    offline = llm("offline")
    local = LLM(str(llama_dir), max_loras=1, max_lora_rank=16)
    from_hub = offline.generate("x", GREEDY, cached)[0].outputs[0].token_ids
    assert (
        from_hub
        == local.generate("x", GREEDY, LoRARequest("sql", 1, str(good_adapter)))[0]
        .outputs[0]
        .token_ids
    )
    with pytest.raises(
        AdapterNotFoundError, match=r"not in the local hub cache.*LORAFLEET_HUB=offline"
    ):
        offline.generate("x", GREEDY, elsewhere)
    # HF_HUB_OFFLINE=1 keeps even an `online` worker off the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    online = llm("online")
    assert online.generate("x", GREEDY, cached)[0].outputs[0].token_ids == from_hub
    with pytest.raises(AdapterNotFoundError, match="HF_HUB_OFFLINE=1"):
        online.generate("x", GREEDY, elsewhere)


def test_a_hub_snapshot_linking_outside_the_cache_is_refused(llama_dir, good_adapter, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    _hub_cache_with(good_adapter, cache, "acme/evil")
    snapshot = next((cache / "models--acme--evil" / "snapshots").iterdir())
    (snapshot / "adapter_config.json").unlink()
    (snapshot / "adapter_config.json").symlink_to(good_adapter / "adapter_config.json")
    llm = LLM(
        str(llama_dir), max_loras=1, max_lora_rank=16, hub="offline", hub_cache_dir=str(cache)
    )
    with pytest.raises(AdapterPathForbiddenError, match="links outside"):
        llm.generate("x", GREEDY, LoRARequest("evil", 1, "acme/evil"))


def test_the_hub_setting_reaches_the_worker_engine(tmp_path):
    from lorafleet.worker.serve.settings import WorkerConfig

    (tmp_path / "config.json").write_text(json.dumps({}))
    env = {
        "LORAFLEET_MODEL": str(tmp_path),
        "LORAFLEET_HUB": "offline",
        "LORAFLEET_HUB_CACHE": str(tmp_path),
    }
    engine = WorkerConfig.from_env(env).engine_config()
    assert (engine.hub, engine.hub_cache_dir, engine.adapter_roots) == (
        "offline",
        str(tmp_path),
        (),
    )
