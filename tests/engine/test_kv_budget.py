"""KV-cache sizing and the context length: decided from config.json before the weights
load, lowered with a warning when it was not asked for, refused with the settings to change
when it was."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from lorafleet.worker import LLM
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.kv_budget import (
    CPU_MAX_BYTES,
    KVBudgetError,
    available_ram,
    kv_token_bytes,
    merging_fits,
    plan_kv_cache,
    weight_bytes,
)
from lorafleet.worker.model.loader import read_model_args

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def args(llama_dir):
    return read_model_args(llama_dir)[0]


def _plan(llama_dir, args, **fields):
    return plan_kv_cache(EngineConfig(model=str(llama_dir), **fields), args, torch.float32, CPU)


def test_an_explicit_budget_holds_what_it_can_and_nothing_more_than_useful(llama_dir, args):
    per_token = kv_token_bytes(args, torch.float32)  # 2 layers x 2 heads x 16 x 2 x 4 bytes
    assert per_token == 2 * 2 * 2 * 16 * 4
    plan = _plan(llama_dir, args, kv_cache_bytes=64 * 16 * per_token, max_model_len=256)
    assert (plan.num_blocks, plan.max_model_len) == (64, 256)
    # 8 sequences of 256 tokens use 2048 tokens (+ a block of slack): the rest would idle.
    big = _plan(llama_dir, args, kv_cache_bytes=1 << 30, max_model_len=256, max_num_seqs=8)
    assert big.num_tokens == 8 * 256 + 16


def test_an_unrequested_context_is_lowered_to_what_fits_with_a_warning(llama_dir, args, caplog):
    per_token = kv_token_bytes(args, torch.float32)
    with caplog.at_level(logging.WARNING, logger="lorafleet.worker.engine.kv_budget"):
        plan = _plan(llama_dir, args, kv_cache_bytes=20 * 16 * per_token)
    assert plan.max_model_len == 320 < args.max_position_embeddings == 512
    (record,) = caplog.records
    assert "max_model_len lowered from the model's 512 to 320" in record.getMessage()
    assert "--kv-cache-mb" in record.getMessage()


def test_a_requested_context_that_does_not_fit_names_the_settings(llama_dir, args):
    per_token = kv_token_bytes(args, torch.float32)
    with pytest.raises(KVBudgetError) as err:
        _plan(llama_dir, args, kv_cache_bytes=20 * 16 * per_token, max_model_len=512)
    message = str(err.value)
    assert "holds 320 tokens" in message and "fewer than max_model_len 512" in message
    for setting in ("kv_cache_bytes (LLM)", "--kv-cache-mb", "LORAFLEET_KV_CACHE_MB"):
        assert setting in message
    for setting in ("--max-model-len", "LORAFLEET_MAX_MODEL_LEN"):
        assert setting in message


def test_a_context_past_the_model_limit_is_refused(llama_dir, args):
    with pytest.raises(KVBudgetError, match="longer than the model's limit of 512 tokens"):
        _plan(llama_dir, args, max_model_len=4096)


def test_the_cpu_default_is_a_bounded_share_of_the_available_ram(llama_dir, args):
    plan = _plan(llama_dir, args, max_num_seqs=1 << 20)  # so the share, not use, bounds it
    share = min(available_ram() // 4, CPU_MAX_BYTES)
    assert plan.cache_bytes == pytest.approx(share, abs=64 << 20)  # RAM moves a little
    assert "available RAM" in plan.source


def test_merging_is_on_only_where_a_merged_copy_fits(llama_dir, args, caplog):
    """Merged weights (``merge_after_steps``) need one more copy of the LoRA linears: on
    when that takes at most half the RAM left after the KV cache, else off with a warning
    naming the setting; the engine's adapters get the decision."""
    plan = _plan(llama_dir, args)
    assert merging_fits(args, torch.float32, plan)
    huge = args.__class__(**{**vars(args), "num_layers": available_ram() // 1000})
    with caplog.at_level(logging.WARNING):
        assert not merging_fits(huge, torch.float32, plan)
    assert "LORAFLEET_MERGE_AFTER_STEPS=0" in caplog.text and "merge_after_steps=0" in caplog.text
    assert LLM(str(llama_dir), device="cpu").engine.adapters.config.merge_after_steps == 16
    off = LLM(str(llama_dir), device="cpu", merge_after_steps=0)
    assert all(lin.hot.merge_after == 0 for lin, _ in off.engine.adapters.linears.values())


def test_weight_bytes_counts_the_parameters(llama_dir, args):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    expected = sum(p.numel() for p in model.parameters()) * 4
    assert weight_bytes(args, torch.float32) == expected


def test_the_refusal_comes_before_the_weights_load(llama_dir, tmp_path, monkeypatch):
    """A context that cannot fit fails from config.json alone (the weights file is never
    opened: here it is not even there)."""
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(llama_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(KVBudgetError, match="fewer than max_model_len"):
        LLM(str(folder), kv_cache_bytes=4096, max_model_len=512, device="cpu")


def test_llm_defaults_to_auto_device(llama_dir):
    llm = LLM(str(llama_dir), max_model_len=64)
    assert llm.engine.config.device == "auto"
    assert llm.engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_the_worker_refuses_a_context_it_cannot_hold_in_one_line(tmp_path):
    """``lorafleet worker`` with a context the cache cannot hold: one line naming the
    settings, exit status 2, no traceback."""
    from lorafleet.producer.redis_server import EmbeddedRedis
    from lorafleet.worker.demo.synthetic import build_random_model

    # 8 layers x 4 KV heads x 16 x 2 x 4 bytes = 4 KiB a token: 1 MiB holds 256 tokens.
    model = build_random_model(tmp_path / "deep", num_hidden_layers=8, num_key_value_heads=4)

    with EmbeddedRedis() as server:
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lorafleet.worker.cli",
                "worker",
                "--model",
                str(model),
                "--redis-url",
                server.url,
                "--kv-cache-mb",
                "1",
                "--max-model-len",
                "512",
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    assert "holds 256 tokens" in output and "fewer than max_model_len 512" in output, output
    assert "--kv-cache-mb" in output and "LORAFLEET_MAX_MODEL_LEN" in output, output
    assert time.monotonic() - started < 60
