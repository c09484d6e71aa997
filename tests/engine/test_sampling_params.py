"""vLLM's sampling parameters: each checked against transformers' own logits processors or
a float64 computation, on the sampler alone and through the engine (tiny random model)."""

from __future__ import annotations

import pytest
import torch
from sampling_reference import OpenAIPenalties
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lorafleet.producer import SamplingParams
from lorafleet.producer.types import MAX_LOGPROBS
from lorafleet.worker import LLM
from lorafleet.worker.engine.sampler import filtered_probs


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), enable_lora=False, max_model_len=128, device="cpu")


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


def _hf_greedy(hf_model, llm, prompt: str, max_tokens: int, processors: list) -> list[int]:
    ids = torch.tensor([llm.engine.encode(prompt)])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList(processors),
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n": 0}, "n must be an integer >= 1"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
        ({"presence_penalty": 3.0}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -2.5}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"logit_bias": {5: 150.0}}, r"logit_bias values must be finite and within \[-100, 100\]"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids cannot be empty"),
        ({"allowed_token_ids": [3, -2]}, "allowed_token_ids must be token ids"),
        ({"logprobs": MAX_LOGPROBS + 1}, r"logprobs must be an integer in \[0, 20\]"),
        ({"prompt_logprobs": -1}, r"prompt_logprobs must be an integer in \[0, 20\]"),
    ],
)
def test_bad_sampling_params_are_refused_with_the_field_named(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_out_of_vocabulary_token_ids_are_refused_by_the_engine(llm):
    from lorafleet.producer.errors import InvalidRequestError

    vocab = llm.engine.args.vocab_size
    for params in (
        SamplingParams(logit_bias={vocab: 1.0}),
        SamplingParams(allowed_token_ids=[1, vocab + 3]),
    ):
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            llm.generate("hi", params)
    assert not llm.engine.has_unfinished()


# -- the sampler against transformers' warpers, float64 -----------------------------------


@pytest.mark.parametrize(
    "temperature, min_p, top_k, top_p",
    [(0.7, 0.0, 0, 1.0), (1.3, 0.05, 0, 1.0), (1.0, 0.0, 7, 0.9), (0.8, 0.1, 20, 0.6)],
)
def test_filtered_probs_equal_transformers_warpers(temperature, min_p, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 64, dtype=torch.float64) * 3
    warpers = [TemperatureLogitsWarper(temperature)]
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = LogitsProcessorList(warpers)(None, logits.clone()).softmax(dim=-1)

    def column(value: float) -> torch.Tensor:
        return torch.full((6,), value, dtype=torch.float64)

    ours = filtered_probs(
        logits.clone(),
        column(temperature),
        column(min_p),
        column(top_k if top_k > 0 else float("inf")),
        column(top_p),
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


# -- through the engine --------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers_greedy(llm, hf_model, penalty):
    params = SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=penalty
    )
    ours = llm.generate("hello hello", params)[0].outputs[0].token_ids
    plain = llm.generate(
        "hello hello", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    )
    reference = _hf_greedy(
        hf_model, llm, "hello hello", 24, [RepetitionPenaltyLogitsProcessor(penalty)]
    )
    assert ours == reference
    assert ours != plain[0].outputs[0].token_ids  # the penalty changed something


def test_presence_and_frequency_penalties_equal_a_float64_reference(llm, hf_model):
    prompt = "abab"
    params = SamplingParams(
        max_tokens=24,
        temperature=0,
        ignore_eos=True,
        presence_penalty=0.6,
        frequency_penalty=0.9,
        repetition_penalty=1.1,
    )
    ours = llm.generate(prompt, params)[0].outputs[0].token_ids
    prompt_len = len(llm.engine.encode(prompt))
    reference = _hf_greedy(
        hf_model,
        llm,
        prompt,
        24,
        [RepetitionPenaltyLogitsProcessor(1.1), OpenAIPenalties(prompt_len, 0.6, 0.9)],
    )
    assert ours == reference


def test_logit_bias_and_allowed_token_ids_steer_greedy_decoding(llm):
    base = llm.generate("hello", SamplingParams(max_tokens=6, temperature=0))[0]
    favourite = llm.engine.encode("z")[0]
    biased = llm.generate(
        "hello", SamplingParams(max_tokens=6, temperature=0, logit_bias={favourite: 100.0})
    )[0]
    assert biased.outputs[0].token_ids == [favourite] * 6
    allowed = [llm.engine.encode(c)[0] for c in "xy"]
    for temperature in (0.0, 1.5):
        out = llm.generate(
            ["hello", "world"],
            SamplingParams(max_tokens=12, temperature=temperature, allowed_token_ids=allowed),
        )
        for o in out:
            assert set(o.outputs[0].token_ids) <= set(allowed), o.outputs[0].token_ids
    assert base.outputs[0].token_ids != biased.outputs[0].token_ids


def test_logprobs_are_the_raw_distribution_of_transformers(llm, hf_model):
    prompt = "the queue"
    params = SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    out = llm.generate(prompt, params)[0]
    completion = out.outputs[0]
    ids = out.prompt_token_ids + completion.token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    expected = logits.log_softmax(dim=-1)
    n_prompt = len(out.prompt_token_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    for k, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = expected[n_prompt - 1 + k]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(3).indices.tolist()
        assert set(entry) == {token, *top}  # the sampled token, then the top 3
        for rank, t in enumerate(top, start=1):
            assert entry[t].rank == rank
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token])
    total = sum(
        e[t].logprob for e, t in zip(completion.logprobs, completion.token_ids, strict=True)
    )
    assert completion.cumulative_logprob == pytest.approx(total)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
    for j in range(1, n_prompt):
        entry, token = out.prompt_logprobs[j], ids[j]
        assert entry[token].logprob == pytest.approx(expected[j - 1, token].item(), abs=1e-4)
        assert len(entry) in (2, 3)  # the prompt token, then the top 2 (one may be it)


def test_prompt_logprobs_survive_chunked_prefill(llama_dir):
    """A prompt prefilled in chunks scores every prompt token once, the same as unchunked."""
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    prompt = "a long prompt that takes several chunks to prefill " * 2
    whole = LLM(str(llama_dir), enable_lora=False, max_model_len=256, device="cpu")
    chunked = LLM(
        str(llama_dir),
        enable_lora=False,
        max_model_len=256,
        device="cpu",
        max_num_batched_tokens=16,
    )
    a = whole.generate(prompt, params)[0].prompt_logprobs
    b = chunked.generate(prompt, params)[0].prompt_logprobs
    assert a[0] is None and b[0] is None and len(a) == len(b) > 16
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x.keys() == y.keys()
        for t in x:
            assert x[t].logprob == pytest.approx(y[t].logprob, abs=1e-4)


def test_n_completions_are_independent_and_reproducible_under_a_seed(llm):
    params = SamplingParams(n=4, max_tokens=10, temperature=1.2, seed=11, ignore_eos=True)
    first = llm.generate("hello", params)[0]
    again = llm.generate(["zz", "hello"], [SamplingParams(max_tokens=3), params])[1]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    single = llm.generate(
        "hello", SamplingParams(max_tokens=10, temperature=1.2, seed=11, ignore_eos=True)
    )
    assert single[0].outputs[0].token_ids == first.outputs[0].token_ids
    greedy = llm.generate("hello", SamplingParams(n=3, max_tokens=6, temperature=0))[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1


def test_n_completions_end_independently_and_abort_together(llm):
    greedy = llm.generate("hello", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    stop_at = greedy.token_ids[2]
    params = [
        SamplingParams(n=2, max_tokens=8, temperature=0, stop_token_ids=[stop_at]),
    ]
    out = llm.generate("hello", params)[0]
    assert all(c.finish_reason == "stop" and c.stop_reason == stop_at for c in out.outputs)
    engine = llm.engine
    engine.add_request("n3", "hello", SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    engine.step()
    aborted = engine.abort("n3")
    assert aborted.finished and len(aborted.output.outputs) == 3
    assert all(c.finish_reason == "abort" for c in aborted.output.outputs)
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


def test_stop_string_kept_when_asked_and_special_tokens_shown_when_asked(llm):
    greedy = llm.generate("hello", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    stop = greedy.text[3:5]
    cut = llm.generate("hello", SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    kept = llm.generate(
        "hello",
        SamplingParams(max_tokens=12, temperature=0, stop=[stop], include_stop_str_in_output=True),
    )
    assert kept[0].outputs[0].text == cut[0].outputs[0].text + stop
    assert kept[0].outputs[0].text == greedy.text[: greedy.text.index(stop) + len(stop)]
    eos = llm.engine.tokenizer.eos_token
    eos_id = llm.engine.tokenizer.eos_token_id
    forced = dict(max_tokens=3, temperature=0, ignore_eos=True, logit_bias={eos_id: 100.0})
    hidden = llm.generate("hi", SamplingParams(**forced))[0].outputs[0]
    shown = llm.generate("hi", SamplingParams(**forced, skip_special_tokens=False))[0].outputs[0]
    assert hidden.token_ids == shown.token_ids == [eos_id] * 3
    assert hidden.text == "" and shown.text == eos * 3
