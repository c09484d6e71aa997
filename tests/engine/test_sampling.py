"""Per-request sampling controls in one batch, and text deltas."""

from __future__ import annotations

import pytest

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), enable_lora=False, max_model_len=128)


def _tokens(out):
    return out.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = llm.generate("abc", p)[0]
    mixed = llm.generate(
        ["zzz", "abc", "q"],
        [
            SamplingParams(max_tokens=5, temperature=0.7),
            p,
            SamplingParams(max_tokens=3, temperature=0),
        ],
    )[1]
    assert _tokens(alone) == _tokens(mixed)
    other = llm.generate("abc", SamplingParams(max_tokens=10, temperature=1.0, seed=99))[0]
    assert _tokens(other) != _tokens(alone)


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    greedy = llm.generate("hello", SamplingParams(max_tokens=8, temperature=0))[0]
    k1 = llm.generate("hello", SamplingParams(max_tokens=8, temperature=1.5, top_k=1))[0]
    p0 = llm.generate("hello", SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6))[0]
    assert _tokens(k1) == _tokens(greedy) == _tokens(p0)


def test_sampling_differs_from_greedy_at_high_temperature(llm):
    greedy = _tokens(llm.generate("hello", SamplingParams(max_tokens=12, temperature=0))[0])
    outs = llm.generate(["hello"] * 4, SamplingParams(max_tokens=12, temperature=5.0))
    assert any(_tokens(o) != greedy for o in outs)


def test_stop_token_ids_and_max_tokens(llm):
    greedy = _tokens(llm.generate("hello", SamplingParams(max_tokens=8, temperature=0))[0])
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = llm.generate(
        "hello", SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at])
    )[0].outputs[0]
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    length = llm.generate("hello", SamplingParams(max_tokens=3, temperature=0))[0].outputs[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 3


def test_stop_string_cuts_text(llm):
    full = llm.generate("hello", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    out = llm.generate("hello", SamplingParams(max_tokens=10, temperature=0, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full.text[: full.text.index(stop)]


def test_min_tokens_and_ignore_eos(llm):
    eos = sorted(llm.engine.eos_token_ids)[0]
    # Make EOS the greedy choice via stop_token_ids-free path: ignore_eos keeps going.
    out = llm.generate(
        "hello", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, min_tokens=7)
    )[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert eos not in out.token_ids  # min_tokens bans EOS until it is reached


def test_stream_deltas_concatenate_to_text(llm):
    engine = llm.engine
    engine.add_request("s", "stream me", SamplingParams(max_tokens=12, temperature=0, stop=["zz"]))
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.delta_text)
            final = out.output or final
    assert "".join(pieces) == final.outputs[0].text


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", "abort me", SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.has_unfinished()


def test_stop_string_before_min_tokens_does_not_stop(llm):
    full = llm.generate("hello", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    stop = full.text[0]
    out = llm.generate(
        "hello", SamplingParams(max_tokens=10, temperature=0, stop=[stop], min_tokens=10)
    )[0].outputs[0]
    # Not stopped (nor cut) at the early occurrence: all ten tokens, text kept from the start.
    assert len(out.token_ids) == 10
    assert out.text.startswith(stop) and full.text.startswith(out.text)
