"""A re-run continues after the tokens its previous run streamed: in the engine, the same
output as an uninterrupted run; from the stream, only a complete, unfinished run counts."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from lorafleet.producer import SamplingParams
from lorafleet.producer.keys import stream_key
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.producer.stream import FIELD, StreamEvent, encode_event
from lorafleet.worker import LLM
from lorafleet.worker.serve.resume import earlier_tokens, resume_point

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), enable_lora=False, max_model_len=128, device="cpu")


def _run(llm: LLM, prompt: str, params: SamplingParams, resume: list[int]):
    engine = llm.engine
    engine.add_request("resumed", prompt, params, resume_token_ids=resume)
    deltas, output = [], None
    while output is None:
        for out in engine.step():
            deltas.append(out.delta_text)
            output = out.output if out.finished else output
    return deltas, output


@pytest.mark.parametrize("cut", [1, 5, 23])
def test_a_resumed_request_ends_as_an_uninterrupted_one(llm, cut):
    (whole,) = llm.generate("hello", GREEDY)
    tokens = whole.outputs[0].token_ids
    deltas, out = _run(llm, "hello", GREEDY, tokens[:cut])
    assert out.outputs[0].token_ids == tokens
    assert out.outputs[0].text == whole.outputs[0].text == "".join(deltas)
    assert out.prompt_token_ids == whole.prompt_token_ids


def test_a_stop_string_across_the_resume_point_still_stops(llm):
    """The resumed tokens end inside a stop string's first occurrence: the continuation
    stops there as the uninterrupted run does (one character per token here)."""
    for prompt in ("redis", "abc", "lora", "xyz"):
        text = llm.generate(prompt, GREEDY)[0].outputs[0].text
        at = next((i for i in range(len(text) - 2) if text[i] != text[i + 1]), None)
        if at is not None and text.index(text[at : at + 3]) == at:
            break
    else:
        pytest.fail("no output with a change of character to stop on")
    stop = text[at : at + 3]
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop])
    (expected,) = llm.generate(prompt, params)
    resumed = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids[: at + 1]
    _, out = _run(llm, prompt, params, resumed)
    assert out.outputs[0].text == expected.outputs[0].text == text[:at]
    assert out.outputs[0].stop_reason == stop


def test_requests_that_cannot_continue_faithfully_start_over(llm):
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    assert not seeded.resumable and not SamplingParams(n=2).resumable
    assert not SamplingParams(logprobs=1).resumable and GREEDY.resumable
    (whole,) = llm.generate("abc", seeded)
    _, out = _run(llm, "abc", seeded, [1, 2, 3])  # ignored: the seed's own output
    assert out.outputs[0].token_ids == whole.outputs[0].token_ids
    _, out = _run(llm, "abc", GREEDY, list(range(40)))  # more than max_tokens: start over
    assert out.outputs[0].token_ids == llm.generate("abc", GREEDY)[0].outputs[0].token_ids


def _event(attempt: int, seq: int, tokens: list[int], final: bool = False) -> StreamEvent:
    from lorafleet.producer.codec import JobResult

    result = JobResult(request_id="j") if final else None
    return StreamEvent(attempt=attempt, seq=seq, token_ids=tokens, result=result)


@pytest.mark.parametrize(
    "events, attempt, expected",
    [
        ([], 2, []),
        ([(1, 0, [5, 6]), (1, 1, [7])], 2, [5, 6, 7]),
        ([(1, 0, [5, 6]), (1, 1, [7]), (1, 1, [7])], 2, [5, 6, 7]),  # a retried XADD
        ([(1, 1, [7]), (1, 2, [8])], 2, []),  # the first events were trimmed away
        ([(1, 0, [5]), (1, 1, [6], True)], 2, []),  # that run ended: nothing to continue
        ([(1, 0, [5, 6]), (2, 0, [5]), (2, 1, [9])], 3, [5, 9]),  # the latest run counts
        ([(1, 0, [5, 6])], 1, []),  # the current run's own events do not
    ],
)
def test_earlier_tokens_come_from_the_last_complete_unfinished_run(events, attempt, expected):
    async def scenario(url: str) -> list[int]:
        r = aioredis.Redis.from_url(url)
        try:
            await r.delete(stream_key("j"))
            for a, seq, tokens, *final in events:
                event = _event(a, seq, tokens, bool(final and final[0]))
                await r.xadd(stream_key("j"), {FIELD: encode_event(event)})
            return await earlier_tokens(r, "j", attempt)
        finally:
            await r.aclose()

    with EmbeddedRedis() as server:
        assert asyncio.run(scenario(server.url)) == expected
    assert resume_point([5, 6, 7]) == [5, 6]
