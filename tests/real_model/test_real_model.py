"""The real model, in process: chat-templated mixed batches equal transformers + PEFT token
for token with slots evicting; n, logprobs and penalties against transformers."""

from __future__ import annotations

import pytest
import torch
from real_model_support import QUESTIONS, chat_prompt_ids

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The catalog name and no other setting: device, KV cache and context are defaults."""
    return LLM("smollm2", max_loras=2, max_lora_rank=32)


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_defaults_serve_the_whole_context(llm, real_model):
    assert llm.engine.max_model_len == 8192  # the model's, which the default cache holds
    assert llm.engine.model_name == "smollm2-135m-instruct"
    (out,) = llm.chat(_chat("What is the capital of France?"), GREEDY)
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.prompt_token_ids == chat_prompt_ids(llm.get_tokenizer(), QUESTIONS[0])


def test_mixed_batch_with_evicting_slots_equals_peft(llm, real_adapters, peft_reference):
    """Base model and six adapters (two trained, four random; ranks 4-32, attention / MLP /
    all targets, some on a subset of layers) in one batch through two slots, each request
    equal to transformers + PEFT alone."""
    n = len(real_adapters)
    requests = [
        (lora, question)
        for i, question in enumerate(QUESTIONS)
        for lora in (None, real_adapters[i % n], real_adapters[(i + 3) % n])
    ]
    outs = llm.chat(
        [_chat(q) for _, q in requests], GREEDY, lora_request=[lora for lora, _ in requests]
    )
    assert llm.engine.adapters.stats.slot_evictions > 0
    expected = peft_reference(requests, MAX_TOKENS)
    for (lora, question), out, tokens in zip(requests, outs, expected, strict=True):
        assert out.outputs[0].token_ids == tokens, (lora and lora.lora_name, question)
    texts = {o.outputs[0].text for o in outs[: 3 * 2]}
    assert len(texts) > 2  # the adapters change the answers


def test_single_streams_on_merged_weights_equal_peft(real_adapters, peft_reference):
    """``merge_after_steps=4``: one chat stream at a time on each adapter (trained rank 4
    on q/v, random rank 16 on every target) runs most of its steps on weights merged with the adapter, and
    equals transformers + PEFT token for token; so does a base stream right after."""
    merged = LLM("smollm2", max_loras=2, max_lora_rank=32, merge_after_steps=4,
                 max_model_len=1024, kv_cache_bytes=64 << 20)  # fmt: skip
    requests = [(real_adapters[0], QUESTIONS[0]), (real_adapters[3], QUESTIONS[1])]  # all16
    requests.append((None, QUESTIONS[1]))
    expected = peft_reference(requests, MAX_TOKENS)
    hot = [lin.hot for lin, _ in merged.engine.adapters.linears.values()]
    for (lora, question), tokens in zip(requests, expected, strict=True):
        (out,) = merged.chat(_chat(question), GREEDY, lora_request=lora)
        assert out.outputs[0].token_ids == tokens, lora and lora.lora_name
        if lora is not None:
            assert any(h.plan is not None and h.plan[0] is h.w_merged for h in hot)


def test_n_completions_reproducible_under_a_seed(llm):
    params = SamplingParams(n=3, max_tokens=16, temperature=0.9, seed=5)
    first = llm.chat(_chat(QUESTIONS[2]), params)[0]
    again = llm.chat([_chat(QUESTIONS[0]), _chat(QUESTIONS[2])], params)[1]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


@torch.no_grad()
def test_logprobs_and_prompt_logprobs_equal_transformers(llm, real_model):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=1)
    (out,) = llm.chat(_chat(QUESTIONS[1]), params)
    hf = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    expected = hf(torch.tensor([ids])).logits[0].double().log_softmax(dim=-1)
    n = len(out.prompt_token_ids)
    for k, (token, entry) in enumerate(
        zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
    ):
        row = expected[n - 1 + k]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=2e-3)
        assert set(entry) == {token, *row.topk(5).indices.tolist()}
    for j in range(1, n):
        token = ids[j]
        value = out.prompt_logprobs[j][token].logprob
        assert value == pytest.approx(expected[j - 1, token].item(), abs=2e-3)


@torch.no_grad()
def test_penalties_equal_transformers(llm, real_model):
    from sampling_reference import OpenAIPenalties
    from transformers import (
        AutoModelForCausalLM,
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
    )

    question = "List five colours, then list them again."
    penalties = {"repetition_penalty": 1.2, "presence_penalty": 0.4, "frequency_penalty": 0.3}
    params = SamplingParams(max_tokens=32, temperature=0, **penalties)
    (out,) = llm.chat(_chat(question), params)
    hf = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    ids = torch.tensor([chat_prompt_ids(llm.get_tokenizer(), question)])
    processors = [  # the same penalties, as transformers and the float64 reference apply them
        RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
        OpenAIPenalties(
            ids.shape[1], presence=params.presence_penalty, frequency=params.frequency_penalty
        ),
    ]
    reference = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=32,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        logits_processor=LogitsProcessorList(processors),
        pad_token_id=2,
    )[0, ids.shape[1] :].tolist()
    assert out.outputs[0].token_ids == reference
    plain = llm.chat(_chat(question), SamplingParams(max_tokens=32, temperature=0))[0]
    assert plain.outputs[0].token_ids != reference  # the penalties changed the answer
