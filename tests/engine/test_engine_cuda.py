"""The engine on CUDA: compiled Triton kernels inside the real model, against PEFT on the CPU.

Skipped without a CUDA device (CI has none); run on a GPU host with ``pytest -m gpu``.
The reference is transformers + PEFT in fp32 on the CPU, as in ``test_engine_peft``.
"""

from __future__ import annotations

import pytest
import torch
from engine_process_runner import generate_in_engine_process
from test_engine_peft import MAX_TOKENS, PROMPTS, PeftReference, _mixed
from test_engine_step import PROMPTS as STEP_PROMPTS
from test_engine_step import stopping_params

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.engine.config import EngineConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def _prefill_logits(llm: LLM, requests) -> torch.Tensor:
    """Last-token logits of one step that holds every request (float32, on the CPU)."""
    engine = llm.engine
    for i, lora in enumerate(requests):
        engine.add_request(f"r{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(), lora)
    batch = engine.scheduler.schedule()
    assert len(batch) == len(requests)
    return engine.runner.execute(batch).float().cpu()


def test_cuda_mixed_batch_equals_peft(llama_dir, adapter_factory):
    """fp32 on CUDA, slots evicted and reloaded mid-run: token for token as PEFT."""
    loras = [req for _, req in adapter_factory(llama_dir)]
    ref = PeftReference(llama_dir, loras)
    prompts, requests = _mixed(loras)
    llm = LLM(str(llama_dir), device="cuda", dtype="float32", max_loras=2, max_lora_rank=64)
    outs = llm.generate(prompts, GREEDY, requests)
    assert llm.engine.adapters.stats.slot_evictions > 0
    for prompt, lora, out in zip(prompts, requests, outs, strict=True):
        assert out.outputs[0].token_ids == ref.generate(prompt, lora), (prompt, lora)


def test_cuda_graph_decode_equals_peft(llama_dir, adapter_factory):
    """Decode steps captured and replayed as CUDA graphs (fp32, slots evicted mid-run)."""
    loras = [req for _, req in adapter_factory(llama_dir)]
    ref = PeftReference(llama_dir, loras)
    prompts, requests = _mixed(loras)
    llm = LLM(
        str(llama_dir),
        device="cuda",
        dtype="float32",
        max_loras=2,
        max_lora_rank=64,
        cuda_graphs=True,
    )
    outs = llm.generate(prompts, GREEDY, requests)
    graphs = llm.engine.runner.graphs
    assert graphs.capture and graphs.replays > len(graphs.graphs) > 0
    for prompt, lora, out in zip(prompts, requests, outs, strict=True):
        assert out.outputs[0].token_ids == ref.generate(prompt, lora), (prompt, lora)


def _first_decode_logits(llm: LLM, requests) -> torch.Tensor:
    """Logits of the first decode step after a prefill step (float32, on the CPU)."""
    engine = llm.engine
    for i, lora in enumerate(requests):
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        engine.add_request(f"r{i}", PROMPTS[i % len(PROMPTS)], params, lora)
    engine.step()  # the prefill, eager
    engine.collect()
    batch = engine.scheduler.schedule()
    assert all(n == 1 for n in batch.num_new_tokens)
    return engine.runner.execute(batch).float().cpu()


def test_cuda_graph_decode_logits_match_eager_in_bf16(llama_dir, adapter_factory):
    """The replayed decode step (padded batch, static LoRA metadata) against the eager one,
    bf16: the same logits up to bf16 rounding of differently tiled kernels."""
    loras = [req for _, req in adapter_factory(llama_dir)]
    requests = [None, *loras, loras[0]]  # 7 sequences: padded to the bucket of 8
    kw = dict(device="cuda", dtype="bfloat16", max_loras=len(loras), max_lora_rank=64)
    eager = _first_decode_logits(LLM(str(llama_dir), **kw), requests)
    graph_llm = LLM(str(llama_dir), cuda_graphs=True, **kw)
    graph = _first_decode_logits(graph_llm, requests)
    assert graph_llm.engine.runner.graphs.replays == 1 and graph.shape == eager.shape
    for i in range(len(requests)):
        err = float((graph[i] - eager[i]).norm() / eager[i].norm())
        assert err < 3e-2, (i, err)


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_cuda_prefill_logits_match_peft(llama_dir, adapter_factory, dtype, tol):
    """Every adapter and the base model in one step; norm-wise relative error per request
    (bf16 weights and activations: about bf16's epsilon times a few layers)."""
    loras = [req for _, req in adapter_factory(llama_dir)]
    ref = PeftReference(llama_dir, loras)
    requests = [None, *loras]
    llm = LLM(str(llama_dir), device="cuda", dtype=dtype, max_loras=len(loras), max_lora_rank=64)
    logits = _prefill_logits(llm, requests)
    for i, lora in enumerate(requests):
        expected = ref.last_logits(PROMPTS[i % len(PROMPTS)], lora)
        err = float((logits[i] - expected).norm() / expected.norm())
        assert err < tol, (dtype, lora, err)


def test_engine_process_on_cuda_equals_in_process(llama_dir, adapter_factory):
    """The worker's engine child process initialises CUDA itself and returns what the
    in-process engine returns."""
    adapters = [req for spec, req in adapter_factory(llama_dir) if spec.rank <= 16]
    loras = [None, adapters[0], adapters[1], None, adapters[0]]
    prompts = [f"prompt {i}" for i in range(len(loras))]
    kw = dict(device="cuda", dtype="float32", max_loras=2, max_lora_rank=16)
    expected = LLM(str(llama_dir), **kw).generate(prompts, GREEDY, lora_request=loras)
    config = EngineConfig(model=str(llama_dir), **kw)
    info, results = generate_in_engine_process(config, prompts, GREEDY, loras)
    assert info.config.device.startswith("cuda") and info.dtype == "float32"
    assert [r.outputs[0].token_ids for r in results] == [e.outputs[0].token_ids for e in expected]


def test_cuda_pipelined_steps_end_requests_as_the_cpu_engine(llama_dir):
    """On CUDA the engine pipelines its steps: each is queued before the previous one is
    read back, and rows of sequences that what is read back ends are dropped. Outputs,
    finish and stop reasons equal the CPU engine's, which reads every step back at once."""
    cpu = LLM(str(llama_dir), enable_lora=False, max_model_len=128)
    params = stopping_params(cpu)
    expected = cpu.generate(STEP_PROMPTS, params)
    gpu = LLM(str(llama_dir), enable_lora=False, device="cuda", dtype="float32", max_model_len=128)
    assert gpu.engine.pipelined and not cpu.engine.pipelined
    got = gpu.generate(STEP_PROMPTS, params)
    for e, g in zip(expected, got, strict=True):
        e, g = e.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text) == (e.token_ids, e.text)
        assert (g.finish_reason, g.stop_reason) == (e.finish_reason, e.stop_reason)
    assert gpu.engine.blocks.num_free == gpu.engine.blocks.num_blocks


def _busy_gpu() -> None:
    """Queue about a second of GPU time on the current stream."""
    torch.cuda._sleep(2_000_000_000)


def test_reading_tokens_back_waits_for_their_step_only():
    """What pipelining rests on: step N's tokens are read back while the step queued behind
    them still runs."""
    from lorafleet.worker.engine.sampler import SampledTokens

    sampled = SampledTokens(torch.arange(8, device="cuda") * 2)
    _busy_gpu()
    assert sampled.tolist() == [2 * i for i in range(8)]
    assert not torch.cuda.current_stream().query()  # the later work is still running
    torch.cuda.synchronize()


def test_uploads_do_not_wait_for_the_gpu():
    """Queueing a step's inputs while the previous step computes must not wait for it."""
    from lorafleet.kernels.transfer import copy_to_device, int_tensor, to_device

    host = int_tensor(list(range(1000)))
    dst = torch.zeros(1000, dtype=torch.int64, device="cuda")
    _busy_gpu()
    on_device = to_device(host, "cuda")
    copy_to_device(dst, host)
    assert not torch.cuda.current_stream().query()  # returned before the GPU got to them
    torch.cuda.synchronize()
    assert on_device.cpu().tolist() == dst.cpu().tolist() == list(range(1000))
