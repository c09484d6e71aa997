"""Engine tokens/s on a mixed-adapter workload vs transformers + PEFT, in one run.

Workload: N requests spread round-robin over A adapters, each generating exactly T tokens
(greedy, EOS ignored). Baseline: what a user would otherwise do — transformers ``generate``
on a PeftModel, one left-padded batch per adapter, switching with ``set_adapter``.

    python benchmarks/bench_engine.py --requests 64 --adapters 8 --new-tokens 32
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model


def build(root: Path, args) -> tuple[Path, list[LoRARequest]]:
    model = build_random_model(
        root / "model",
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=max(1, args.hidden // 64),
    )
    loras = [
        LoRARequest(
            f"a{i}", i + 1, str(build_random_adapter(model, root / f"a{i}", rank=args.rank, seed=i))
        )
        for i in range(args.adapters)
    ]
    return model, loras


def workload(args, loras):
    prompts = [
        f"request {i}: tell me about adapter number {i % args.adapters}"
        for i in range(args.requests)
    ]
    return prompts, [loras[i % len(loras)] for i in range(args.requests)]


def engine_runner(model: Path, prompts, requests, args):
    llm = LLM(
        str(model),
        max_loras=args.adapters,
        max_lora_rank=args.rank,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        kv_cache_bytes=args.kv_cache_mb * 2**20,
        cuda_graphs=args.cuda_graphs,
    )
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    # Warm-up on the whole workload: on CUDA every kernel variant the batches need compiles
    # here (about a second each), not inside a timed round.
    llm.generate(prompts, params, requests)
    if args.cuda_graphs and llm.engine.runner.graphs is None:
        raise SystemExit(f"CUDA graphs were turned off: {llm.engine.runner.graphs_error}")

    def run() -> float:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, requests)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        return args.requests * args.new_tokens / elapsed

    return run


def peft_runner(model: Path, prompts, requests, args):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype))
    base = base.to(args.device).eval()
    loras = list(dict.fromkeys(requests))
    peft = PeftModel.from_pretrained(base, loras[0].lora_path, adapter_name=loras[0].lora_name)
    for lora in loras[1:]:
        peft.load_adapter(lora.lora_path, adapter_name=lora.lora_name)
    groups = {
        lora: [p for p, r in zip(prompts, requests, strict=True) if r == lora] for lora in loras
    }

    def once(group_prompts, lora):
        peft.set_adapter(lora.lora_name)
        batch = tok(group_prompts, return_tensors="pt", padding=True).to(args.device)
        with torch.no_grad():
            out = peft.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert out.shape[1] - batch.input_ids.shape[1] == args.new_tokens

    once(prompts[:2], loras[0])  # warm-up

    def run() -> float:
        start = time.perf_counter()
        for lora, group in groups.items():
            once(group, lora)
        return args.requests * args.new_tokens / (time.perf_counter() - start)

    return run


def compare(model: Path, loras: list[LoRARequest], args) -> tuple[float, float]:
    """Best tokens/s of the engine and of transformers + PEFT on ``args``' workload over
    ``args.rounds`` alternating rounds (each side warmed up first)."""
    prompts, requests = workload(args, loras)
    ours_run = engine_runner(model, prompts, requests, args)
    base_run = peft_runner(model, prompts, requests, args)
    ours = base = 0.0
    for _ in range(args.rounds):  # alternate so both see the same machine conditions
        ours = max(ours, ours_run())
        base = max(base, base_run())
    return ours, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best of each kept")
    ap.add_argument("--max-num-seqs", type=int, default=128, help="engine batch limit")
    ap.add_argument("--kv-cache-mb", type=int, default=256, help="engine KV cache, MiB")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both sides)")
    ap.add_argument("--cuda-graphs", action="store_true", help="engine decode from CUDA graphs")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, loras = build(Path(tmp), args)
        ours, base = compare(model, loras, args)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"workload: {args.requests} requests over {args.adapters} adapters (rank {args.rank}), "
        f"{args.new_tokens} new tokens each, llama hidden {args.hidden} x {args.layers} layers, "
        f"{args.dtype} {args.device}{', CUDA graphs' if args.cuda_graphs else ''}"
    )
    print(f"best of {args.rounds} alternating rounds")
    print(f"lorafleet engine        : {ours:9.1f} tokens/s")
    print(f"transformers + PEFT     : {base:9.1f} tokens/s (batched per adapter)")
    print(f"ratio (lorafleet / PEFT): {ours / base:9.2f}x")


if __name__ == "__main__":
    main()
