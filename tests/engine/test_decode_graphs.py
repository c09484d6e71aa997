"""Decode steps through the CUDA-graph path: padded static buffers, static LoRA metadata.

On the CPU nothing is captured, but the graph path's whole layout runs: batches and
contexts padded to buckets, padded rows writing to the scratch block, attention tables
built from static inputs, the static ``LoRAMeta``. Its outputs must equal PEFT's token for
token, as eager steps do. ``test_engine_cuda`` captures and replays for real on a GPU.
"""

from __future__ import annotations

import pytest
from test_engine_peft import MAX_TOKENS, PeftReference, _mixed

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.engine.decode_graphs import size_buckets

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.mark.parametrize("limit", [1, 2, 5, 16, 100, 256])
def test_size_buckets_cover_every_size_within_one_and_a_half(limit: int) -> None:
    sizes = size_buckets(limit)
    assert sizes[0] == 1 and sizes[-1] == limit and sizes == sorted(set(sizes))
    for n in range(1, limit + 1):
        bucket = next(s for s in sizes if s >= n)
        assert bucket <= max(2, 1.5 * n), (n, bucket)


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "triton-interpreted"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_graph_decode_equals_peft(
    arch, interpret, monkeypatch, model_factory, adapter_factory
) -> None:
    """Mixed adapters and the base model, slots evicted mid-run, batches shrinking through
    the buckets as requests finish; mistral adds the sliding window to the mask."""
    if interpret:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model_dir = model_factory(arch)
    loras = [req for _, req in adapter_factory(model_dir)]
    ref = PeftReference(model_dir, loras)
    prompts, requests = _mixed(loras)
    llm = LLM(str(model_dir), max_loras=3, max_lora_rank=64, max_cpu_loras=3, cuda_graphs=True)
    # Different lengths: the decode batch shrinks step by step across bucket sizes.
    params = [
        SamplingParams(max_tokens=2 + i % (MAX_TOKENS - 1), temperature=0)
        for i in range(len(prompts))
    ]
    outs = llm.generate(prompts, params, requests)
    graphs = llm.engine.runner.graphs
    assert graphs.replays > 0
    batch_buckets = {key[0] for key in graphs.graphs}
    assert len(batch_buckets) > 2, batch_buckets
    for prompt, lora, param, out in zip(prompts, requests, params, outs, strict=True):
        expected = ref.generate(prompt, lora)[: param.max_tokens]
        assert out.outputs[0].token_ids == expected, (prompt, lora)


def test_graph_key_follows_the_projections_adapters_target(llama_dir, adapter_factory) -> None:
    """A graph captured while adapters touch q/v only has no MLP LoRA ops: when an MLP
    adapter loads, a new graph is captured, and outputs still equal eager steps."""
    by_name = {spec.name: req for spec, req in adapter_factory(llama_dir)}
    qv, mlp = by_name["r8_qv"], by_name["r8_mlp"]
    kw = dict(max_loras=1, max_lora_rank=64)
    graph_llm = LLM(str(llama_dir), cuda_graphs=True, **kw)
    eager_llm = LLM(str(llama_dir), **kw)
    for lora in (qv, mlp, qv, None):
        got = graph_llm.generate(["hello there", "abc"], GREEDY, lora)
        want = eager_llm.generate(["hello there", "abc"], GREEDY, lora)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    keys = list(graph_llm.engine.runner.graphs.graphs)
    targets = {key[1] for key in keys}
    assert None in targets  # the base-only graph runs no LoRA op at all
    assert len(targets - {None}) == 2, keys  # q/v-only and MLP-only


def test_padded_rows_write_only_the_scratch_block(llama_dir) -> None:
    """5 sequences decode in the bucket of 6: the real tokens write their own cache rows, the
    padded row writes the scratch block (outside the block manager's pool), nothing else."""
    llm = LLM(str(llama_dir), enable_lora=False, max_num_seqs=8, cuda_graphs=True)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.scratch_block == engine.blocks.num_blocks
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", f"prompt number {i}", params)
    engine.step()  # the prefill runs eagerly
    engine.collect()
    assert runner.graphs.replays == 0
    bs = runner.block_size
    decode_rows = {
        seq.block_table[seq.num_computed_tokens // bs] * bs + seq.num_computed_tokens % bs
        for seq in engine.scheduler.running
    }
    scratch_rows = set(range(runner.scratch_block * bs, (runner.scratch_block + 1) * bs))
    before = [k.clone() for k, _ in runner.kv_caches]
    engine.step()
    assert runner.graphs.replays == 1 and set(runner.graphs.graphs) == {(6, None)}
    for old, (new, _) in zip(before, runner.kv_caches, strict=True):
        changed = set((old != new).flatten(1).any(1).nonzero().flatten().tolist())
        assert decode_rows <= changed and changed & scratch_rows
        assert changed <= decode_rows | scratch_rows
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefill_and_large_batches_stay_eager(llama_dir) -> None:
    llm = LLM(str(llama_dir), enable_lora=False, max_num_seqs=4, cuda_graphs=True)
    graphs = llm.engine.runner.graphs
    assert graphs.batch_sizes[-1] == 4
    llm.generate(["one two three"] * 3, SamplingParams(max_tokens=4, temperature=0))
    # 3 decode steps of 3 sequences, in the bucket of 3; the prefill ran eagerly.
    assert graphs.replays == 3 and {key[0] for key in graphs.graphs} == {3}


def test_a_failed_capture_turns_graphs_off_and_serves_eagerly(llama_dir, monkeypatch) -> None:
    from lorafleet.worker.engine.decode_graphs import DecodeGraphs

    def broken(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture", broken)
    prompts = ["hello there", "abc", "one two"]
    want = LLM(str(llama_dir), enable_lora=False).generate(prompts, GREEDY)
    llm = LLM(str(llama_dir), enable_lora=False, cuda_graphs=True)
    got = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    runner = llm.engine.runner
    assert runner.graphs is None and "stream is capturing" in runner.graphs_error


def test_engine_process_with_graphs_equals_eager(llama_dir, adapter_factory):
    """The worker's engine child process takes cuda_graphs from its EngineConfig."""
    from engine_process_runner import generate_in_engine_process

    from lorafleet.worker.engine.config import EngineConfig

    lora = next(req for spec, req in adapter_factory(llama_dir) if spec.rank <= 16)
    loras = [None, lora, lora, None]
    prompts = [f"prompt {i}" for i in range(len(loras))]
    expected = LLM(str(llama_dir), max_loras=2).generate(prompts, GREEDY, loras)
    config = EngineConfig(model=str(llama_dir), max_loras=2, cuda_graphs=True)
    info, results = generate_in_engine_process(config, prompts, GREEDY, loras)
    assert info.config.cuda_graphs
    assert [r.outputs[0].token_ids for r in results] == [e.outputs[0].token_ids for e in expected]
