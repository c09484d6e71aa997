"""Usage in process: every ``RequestOutput`` of ``LLM`` carries what the request cost, and an
adapter load is charged to the request that caused it, and to no other."""

from __future__ import annotations

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


def test_usage_on_every_output_and_loads_charged_to_their_cause(llama_dir, adapter_factory):
    (_, first), (_, second) = adapter_factory(llama_dir)[:2]
    llm = LLM(
        str(llama_dir),
        enable_lora=True,
        max_loras=1,  # one slot: the second adapter evicts the first
        max_lora_rank=64,
        max_model_len=128,
        device="cpu",
        adapter_roots=("/",),
    )
    (cold,) = llm.generate("hello there", GREEDY, lora_request=first)
    usage = cold.usage
    assert usage.prompt_tokens == len(cold.prompt_token_ids)
    assert usage.completion_tokens == 5 == len(cold.outputs[0].token_ids)
    assert usage.queue_wait_s is None  # no queue in process
    assert usage.adapter_load_s > 0  # read from disk and written into the slot
    assert usage.engine_s >= usage.adapter_load_s

    (warm,) = llm.generate("hello there", GREEDY, lora_request=first)
    assert warm.usage.adapter_load_s == 0.0  # in its slot already
    (base,) = llm.generate("hello there", GREEDY)
    assert base.usage.adapter_load_s == 0.0

    # n=3: the prompt counted once, every completion's tokens.
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1, ignore_eos=True)
    (many,) = llm.generate("hi", params)
    assert many.usage.prompt_tokens == len(many.prompt_token_ids)
    assert many.usage.completion_tokens == 12

    # The second adapter takes the only slot; two requests on it in one batch: one load,
    # charged once.
    outs = llm.generate(["a", "b"], GREEDY, lora_request=second)
    loads = [o.usage.adapter_load_s for o in outs]
    assert sum(1 for s in loads if s > 0) == 1
    # Back to the first: cached in host memory, written into the slot again.
    (again,) = llm.generate("hello there", GREEDY, lora_request=first)
    assert again.usage.adapter_load_s > 0
    assert llm.engine.adapters.stats.disk_loads == 2
