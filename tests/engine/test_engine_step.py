"""The engine's pipelined step (on CUDA; forced here on the CPU): a call schedules and
queues the next step before it reads the previous one back, so each sequence's last token is
still on the device when its next row is queued. Sequences that end on what is read back
(stop tokens, EOS, stop strings) or by abort must lose their queued rows without a trace,
and every output must equal the unpipelined engine's."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from lorafleet.producer import SamplingParams
from lorafleet.producer.errors import InternalError
from lorafleet.worker import LLM
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.outputs import StepOutput
from lorafleet.worker.engine.sequence import PENDING_TOKEN

PROMPTS = ["hello", "The quick brown fox", "a b c d", "1234", "zebra", "multi-LoRA"]


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    """Pipelined as on a GPU (on the CPU the engine reads each step back at once)."""
    llm = LLM(str(llama_dir), enable_lora=False, max_model_len=128)
    llm.engine.pipelined = True
    return llm


def _run(engine: LLMEngine) -> dict[str, list[StepOutput]]:
    per_request: dict[str, list[StepOutput]] = defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            per_request[out.request_id].append(out)
    return per_request


def _assert_one_stream(outs: list[StepOutput]) -> None:
    """Deltas, then exactly one finished output, last; the deltas add up to its text."""
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    final = outs[-1].output.outputs[0]
    assert "".join(o.delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.delta_token_ids] == final.token_ids


def stopping_params(llm: LLM) -> list[SamplingParams]:
    """Per prompt of ``PROMPTS``: a stop string, a stop token, min_tokens or a shorter
    length, each taken from the prompt's own greedy output so that it fires mid-way."""
    full = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    params = []
    for i, out in enumerate(full):
        text, ids = out.outputs[0].text, out.outputs[0].token_ids
        kind = i % 4
        params.append(
            SamplingParams(
                max_tokens=12 - (i if kind == 3 else 0),
                temperature=0,
                stop=[text[2:4]] if kind == 0 and len(text) >= 4 else None,
                stop_token_ids=[ids[5]] if kind == 1 else None,
                min_tokens=3 if kind == 2 else 0,
            )
        )
    return params


def _completions(outs):
    return [
        (c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in (o.outputs[0] for o in outs)
    ]


def test_a_step_reports_the_previous_step_while_the_next_is_queued(llm):
    engine = llm.engine
    engine.add_request("a", "hello there", SamplingParams(max_tokens=3, temperature=0))
    assert engine.step() == []  # the prefill is queued; nothing is read back yet
    first = engine.step()  # queues the first decode, then reads the prefill's token back
    assert len(first) == 1 and len(first[0].delta_token_ids) == 1
    assert engine.last_step.num_seqs == 1
    # The decode was queued before that token was read back: it took the token on the device.
    (seq,) = engine.scheduler.running
    assert seq.token_ids[-1] == PENDING_TOKEN
    assert seq.token_ids[-2] == first[0].delta_token_ids[0]
    rest = _run(engine)["a"]
    assert rest[-1].finished and len(rest[-1].output.outputs[0].token_ids) == 3
    assert PENDING_TOKEN not in rest[-1].output.outputs[0].token_ids
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_pipelined_outputs_equal_unpipelined(llama_dir, llm):
    """Stop strings, stop tokens, EOS, min_tokens and length limits end each request where
    the unpipelined engine ends it, with the same tokens, text and reasons."""
    plain = LLM(str(llama_dir), enable_lora=False, max_model_len=128)
    params = stopping_params(plain)
    expected = plain.generate(PROMPTS, params)
    assert {o.outputs[0].finish_reason for o in expected} == {"stop", "length"}
    assert _completions(llm.generate(PROMPTS, params)) == _completions(expected)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_pipelined_seeded_sampling_equals_unpipelined(llama_dir, llm):
    """Seeded rows draw on the host when read back, so those steps are read back before the
    next is scheduled; the draws and the greedy rows beside them are unchanged."""
    plain = LLM(str(llama_dir), enable_lora=False, max_model_len=128)
    params = [
        SamplingParams(max_tokens=10, temperature=1.0, seed=7),
        SamplingParams(max_tokens=10, temperature=0),
        SamplingParams(max_tokens=10, temperature=0.8, top_k=5, seed=123),
    ]
    prompts = PROMPTS[:3]
    assert _completions(llm.generate(prompts, params)) == _completions(
        plain.generate(prompts, params)
    )


def test_length_limit_of_the_model_is_kept(llm):
    """A request that would run past max_model_len stops exactly at it: no row is queued
    past the model's length while its last token is still on the device."""
    engine = llm.engine
    prompt_len = len(engine.encode("hello"))
    out = llm.generate("hello", SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
    c = out[0].outputs[0]
    assert c.finish_reason == "length" and prompt_len + len(c.token_ids) == engine.max_model_len
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_stop_string_ends_a_sequence_whose_next_step_is_in_flight(llm):
    """The stop string is found after the sequence's next row was queued: that row's token
    is dropped, nothing follows the finished output, and the blocks come back."""
    full = llm.generate("hello", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    stop = full.text[3:5]
    engine = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
    engine.add_request("s", "hello", params)
    engine.add_request("long", "hello", SamplingParams(max_tokens=12, temperature=0))
    outs = _run(engine)
    for rid in ("s", "long"):
        _assert_one_stream(outs[rid])
    stopped = outs["s"][-1].output.outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full.text[: full.text.index(stop)]
    decode = engine.tokenizer.decode
    n = next(n for n in range(1, 13) if stop in decode(full.token_ids[:n]))
    assert stopped.token_ids == full.token_ids[:n]  # up to the token completing the stop
    assert outs["long"][-1].output.outputs[0].token_ids == full.token_ids
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_while_a_step_is_in_flight(llm):
    engine = llm.engine
    engine.add_request("x", "abort me", SamplingParams(max_tokens=20, temperature=0))
    engine.add_request("y", "keep me", SamplingParams(max_tokens=4, temperature=0))
    assert engine.step() == []
    early = engine.step()  # the first tokens; a decode step for both is in flight
    assert sorted(o.request_id for o in early) == ["x", "y"]
    aborted = engine.abort("x")
    assert aborted.finished and aborted.finish_reason == "abort"
    x_tokens = [t for o in early if o.request_id == "x" for t in o.delta_token_ids]
    assert aborted.output.outputs[0].token_ids == x_tokens  # none still on the device
    outs = _run(engine)
    assert "x" not in outs  # its in-flight row is dropped: no output after the abort
    _assert_one_stream([o for o in early if o.request_id == "y"] + outs["y"])
    assert len(outs["y"][-1].output.outputs[0].token_ids) == 4
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_unpipelined_step_reports_its_own_tokens(llama_dir):
    engine = LLM(str(llama_dir), enable_lora=False, max_model_len=128).engine
    assert not engine.pipelined  # the CPU: the forward blocks, nothing to overlap
    engine.add_request("a", "hello there", SamplingParams(max_tokens=2, temperature=0))
    first = engine.step()  # the prefill and its token
    assert [len(o.delta_token_ids) for o in first] == [1] and not first[0].finished
    second = engine.step()
    assert second[0].finished and not engine.has_unfinished()


def test_stop_string_and_length_on_the_same_token_report_the_stop(llm):
    full = llm.generate("hello", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    stop = full.text[-1]  # completed by the last allowed token at the earliest
    first = full.text.index(stop)
    out = llm.generate("hello", SamplingParams(max_tokens=6, temperature=0, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full.text[:first]


def test_pipelining_benchmark_runs_both_ways_on_the_cpu():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pipelining.py"
    cmd = [sys.executable, str(script), "--requests", "8", "--adapters", "2", "--rounds", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rates = [line for line in res.stdout.splitlines() if line.endswith("tokens/s")]
    assert len(rates) == 2 and "ratio" in res.stdout and "8 requests" in res.stdout


@pytest.mark.parametrize("switch_after", [1, 2, 3, 4, 5, 6])
def test_switching_pipelining_off_mid_run_keeps_outputs(llama_dir, llm, switch_after):
    """The first unpipelined step then reads two steps back at once; a stop string found in
    the first of them must drop the token read back behind it."""
    plain = LLM(str(llama_dir), enable_lora=False, max_model_len=128)
    params = stopping_params(plain)
    expected = plain.generate(PROMPTS, params)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(PROMPTS, params, strict=True)):
        engine.add_request(str(i), prompt, p)
    outs: dict[str, list[StepOutput]] = defaultdict(list)
    try:
        for _ in range(switch_after):
            for out in engine.step():
                outs[out.request_id].append(out)
        engine.pipelined = False
        for rid, more in _run(engine).items():
            outs[rid] += more
    finally:
        engine.pipelined = True
    for i in range(len(PROMPTS)):
        _assert_one_stream(outs[str(i)])
    got = [outs[str(i)][-1].output for i in range(len(PROMPTS))]
    assert _completions(got) == _completions(expected)


def test_generate_fails_loudly_if_the_engine_loses_an_output(llama_dir, monkeypatch):
    """An engine bug that ends a request without its final output must not hang
    ``LLM.generate``: it raises, naming the requests."""
    llm = LLM(str(llama_dir), enable_lora=False, max_model_len=128)
    emit = llm.engine._emit
    monkeypatch.setattr(
        llm.engine, "_emit", lambda appended: [o for o in emit(appended) if not o.finished]
    )
    with pytest.raises(InternalError, match="without an output"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=2, temperature=0))
