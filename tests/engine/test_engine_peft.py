"""The engine equals transformers + PEFT, token for token, on mixed-adapter batches (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from sampling_reference import greedy_continuation

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker import LLM

PROMPTS = [
    "The quick brown fox",
    "hello",
    "Multi-LoRA serving, one base model:",
    "a b c d e f g",
    "1234",
    "zebra crossing at noon",
]
MAX_TOKENS = 12


class PeftReference:
    """Each request run alone through transformers (+ PEFT for adapters), greedy."""

    def __init__(self, model_dir, adapters: list[LoRARequest]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = PeftModel.from_pretrained(
            base, adapters[0].lora_path, adapter_name=adapters[0].lora_name
        )
        for a in adapters[1:]:
            self.model.load_adapter(a.lora_path, adapter_name=a.lora_name)
        self.model.eval()

    def _run(self, fn, lora: LoRARequest | None):
        if lora is None:
            with self.model.disable_adapter():
                return fn()
        self.model.set_adapter(lora.lora_name)
        return fn()

    @torch.no_grad()
    def generate(self, prompt: str, lora: LoRARequest | None) -> list[int]:
        ids = torch.tensor([self.tok(prompt).input_ids])
        return self._run(
            lambda: greedy_continuation(self.model, ids, MAX_TOKENS, top_p=None, top_k=None), lora
        )

    @torch.no_grad()
    def last_logits(self, prompt: str, lora: LoRARequest | None) -> torch.Tensor:
        ids = torch.tensor([self.tok(prompt).input_ids])
        return self._run(lambda: self.model(input_ids=ids).logits[0, -1], lora)


def _mixed(loras: list[LoRARequest]) -> tuple[list[str], list[LoRARequest | None]]:
    """Every prompt with every adapter and with None, interleaved."""
    prompts, requests = [], []
    for i, prompt in enumerate(PROMPTS):
        for j, lora in enumerate([None, *loras]):
            if (i + j) % 2 == 0:
                prompts.append(prompt)
                requests.append(lora)
    return prompts, requests


@pytest.mark.parametrize(
    ("arch", "pipelined"),
    [("llama", False), ("qwen2", False), ("mistral", False), ("llama", True)],
    ids=["llama", "qwen2", "mistral", "llama-pipelined"],
)
def test_mixed_batch_equals_peft(arch, pipelined, model_factory, adapter_factory):
    """Pipelined (as on a GPU), slots are also evicted and loaded while the step before
    is still queued."""
    model_dir = model_factory(arch)
    loras = [req for _, req in adapter_factory(model_dir)]
    ref = PeftReference(model_dir, loras)
    prompts, requests = _mixed(loras)
    assert len({r.lora_int_id for r in requests if r}) > 2
    # max_loras=2 with 5 adapters in one call: slots are evicted and reloaded mid-run.
    llm = LLM(str(model_dir), max_loras=2, max_lora_rank=64, max_cpu_loras=3)
    llm.engine.pipelined = pipelined
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), requests)
    assert llm.engine.adapters.stats.slot_evictions > 0
    assert llm.engine.adapters.stats.cpu_evictions > 0
    for prompt, lora, out in zip(prompts, requests, outs, strict=True):
        expected = ref.generate(prompt, lora)
        assert out.outputs[0].token_ids == expected, (prompt, lora)
        assert out.prompt == prompt and out.lora_request == lora


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_prefill_logits_match_peft(arch, model_factory, adapter_factory):
    model_dir = model_factory(arch)
    loras = [req for _, req in adapter_factory(model_dir)]
    ref = PeftReference(model_dir, loras)
    llm = LLM(str(model_dir), max_loras=len(loras), max_lora_rank=64)
    engine = llm.engine
    requests = [None, *loras]
    for i, lora in enumerate(requests):
        engine.add_request(f"r{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(), lora)
    batch = engine.scheduler.schedule()
    assert len(batch) == len(requests)  # one step holds every adapter and the base model
    logits = engine.runner.execute(batch)
    for i, lora in enumerate(requests):
        expected = ref.last_logits(PROMPTS[i % len(PROMPTS)], lora)
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)


def test_base_requests_equal_plain_transformers(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    llm = LLM(str(llama_dir), enable_lora=False)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs-pipelined"])
def test_chunked_prefill_and_preemption_keep_outputs(llama_dir, adapter_factory, cuda_graphs):
    """A tiny token budget (chunked prefill) and a tiny KV cache (preemption by recompute)
    must not change greedy outputs. With decode graphs, steps mixing prefill chunks run
    eagerly and pure decode steps from the padded static buffers; that run also pipelines
    its steps, as the engine does on a GPU."""
    loras = [req for _, req in adapter_factory(llama_dir)][:2]
    prompts, requests = PROMPTS * 2, [None, loras[0], loras[1]] * 4
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    expected = LLM(str(llama_dir), max_loras=2).generate(prompts, params, requests)
    small = LLM(
        str(llama_dir),
        max_loras=2,
        max_num_batched_tokens=8,
        block_size=4,
        max_model_len=64,
        kv_cache_bytes=20 * (2 * 2 * 4 * 2 * 16 * 4),  # 20 blocks of 4 tokens: forces preemption
        cuda_graphs=cuda_graphs,
    )
    small.engine.pipelined = cuda_graphs
    got = small.generate(prompts, params, requests)
    assert small.engine.scheduler.num_preemptions > 0
    assert (small.engine.runner.graphs is not None) == cuda_graphs
    if cuda_graphs:
        assert small.engine.runner.graphs.replays > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert small.engine.blocks.num_free == small.engine.blocks.num_blocks
    assert small.engine.adapters.slots_in_use == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_triton_kernels_interpreted_equal_peft(arch, monkeypatch, model_factory, adapter_factory):
    """The same mixed batch through the real Triton kernels (interpreted on CPU)."""
    pytest.importorskip("triton")
    from lorafleet.kernels import use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.device("cpu"))
    model_dir = model_factory(arch)
    loras = [req for _, req in adapter_factory(model_dir)]
    ref = PeftReference(model_dir, loras)
    prompts, requests = _mixed(loras)
    llm = LLM(str(model_dir), max_loras=3, max_lora_rank=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), requests)
    for prompt, lora, out in zip(prompts, requests, outs, strict=True):
        assert out.outputs[0].token_ids == ref.generate(prompt, lora), (prompt, lora)


def test_projections_no_active_adapter_targets_skip_the_lora_ops(
    llama_dir, adapter_factory, monkeypatch
):
    """An adapter on q/v only runs LoRA ops on the fused qkv projection alone; one on the MLP
    on gate/up and down alone; evicting a slot clears what its old adapter targeted. A
    single stream takes the hot-slot road (``HotSlot.forward``), a batch could take the
    segmented one (``add_lora_slices``): both are counted."""
    import lorafleet.worker.model.decoder as model_module
    from lorafleet.kernels.segmented import HotSlot

    by_name = {spec.name: req for spec, req in adapter_factory(llama_dir)}
    shrinks: list[int] = []
    real, real_hot = model_module.add_lora_slices, HotSlot.forward

    def counting(x, lora_as, *rest, **options):
        shrinks.append(lora_as[0].shape[-1])  # in_features of the projection
        return real(x, lora_as, *rest, **options)

    def counting_hot(self, x):
        shrinks.append(x.shape[-1])
        return real_hot(self, x)

    monkeypatch.setattr(model_module, "add_lora_slices", counting)
    monkeypatch.setattr(HotSlot, "forward", counting_hot)
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=64)  # one slot: each load evicts
    layers = llm.engine.args.num_layers
    hidden, inter = llm.engine.args.hidden_size, llm.engine.args.intermediate_size
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)  # two steps
    for name, projections in [
        ("r8_qv", [hidden]),  # qkv
        ("r8_mlp", [hidden, inter]),  # gate_up, down
        ("r4", [hidden, hidden, hidden, inter]),  # qkv, o, gate_up, down
        ("r8_qv", [hidden]),
    ]:
        shrinks.clear()
        llm.generate(["hello"], params, by_name[name])
        assert sorted(shrinks) == sorted(projections * layers * 2), name
    shrinks.clear()
    llm.generate(["hello"], params)  # base model only: no LoRA op at all
    assert shrinks == []


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_single_adapter_streams_equal_peft(
    arch, model_factory, adapter_factory, monkeypatch
):
    """``merge_after_steps=3``: each adapter's single stream runs its later steps on weights
    merged with the adapter (qwen2: projections with a bias), a batch of two adapters after
    them on W unchanged; every output equals transformers + PEFT token for token."""
    from lorafleet.kernels.segmented import HotSlot

    merged_steps = []
    real = HotSlot.forward

    def forward(self, x):
        if self.plan[0] is self.w_merged:
            merged_steps.append(1)
        return real(self, x)

    monkeypatch.setattr(HotSlot, "forward", forward)
    model_dir = model_factory(arch)
    loras = [req for _, req in adapter_factory(model_dir)]
    ref = PeftReference(model_dir, loras)
    llm = LLM(str(model_dir), max_loras=2, max_lora_rank=64, merge_after_steps=3)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    for lora in loras:
        merged_steps.clear()
        out = llm.generate([PROMPTS[0]], params, lora)[0].outputs[0].token_ids
        assert out == ref.generate(PROMPTS[0], lora), lora.lora_name
        assert merged_steps, lora.lora_name
    merged_steps.clear()
    outs = llm.generate(PROMPTS[:4], params, [loras[0], loras[1]] * 2)
    assert not merged_steps
    for prompt, lora, out in zip(PROMPTS[:4], [loras[0], loras[1]] * 2, outs, strict=True):
        assert out.outputs[0].token_ids == ref.generate(prompt, lora), (prompt, lora.lora_name)
