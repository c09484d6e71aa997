"""Where an engine step's time goes, base-only vs with adapters: cProfile of one workload each.

    python benchmarks/profile_engine.py --gpu --layers 4          # Llama-3.2-1B shape, 4 layers
    python benchmarks/profile_engine.py --requests 64 --adapters 8  # tiny model on the CPU

Runs the same prompts twice through one in-process engine, without adapters and with
``--adapters`` adapters round-robin, each under cProfile after a warm-up, and prints tokens/s,
steps, mean step time and the functions with the most own and cumulative time. On CUDA, time
spent blocked on the GPU shows as the own time of the call that waited (the engine reads
each step's tokens back with ``Event.synchronize``), so the table separates host work from
device work without a device profiler. The engine is pipelined there (the host works on
one step while the GPU computes the next): a small wait means the host sets the pace, a
large one the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="Llama-3.2-1B shape, bf16, CUDA")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt words (bytes tokenizer)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--targets", help="comma-separated projections (default: the suite's)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--max-num-seqs", type=int, help="engine batch limit (default: the suite's)")
    ap.add_argument("--cuda-graphs", action="store_true", help="decode steps from CUDA graphs")
    ap.add_argument(
        "--parts",
        action="store_true",
        help="instead of cProfile: median ms per step of each part of the engine's step",
    )
    args = ap.parse_args()

    sys.path.insert(0, str(BENCH_DIR))
    from run_all import CPU, GPU

    from lorafleet.producer import LoRARequest, SamplingParams
    from lorafleet.worker import LLM
    from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model

    mode = GPU if args.gpu else CPU
    targets = args.targets.split(",") if args.targets else mode.targets
    shape = dict(mode.model_shape)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory(prefix="lorafleet-profile-") as tmp:
        root = Path(tmp)
        model = build_random_model(
            root / "model", "llama", seed=1, dtype=getattr(torch, mode.dtype), **shape
        )
        loras = [
            LoRARequest(
                f"a{i}",
                i + 1,
                str(
                    build_random_adapter(
                        model, root / f"a{i}", rank=args.rank, target_modules=targets, seed=i
                    )
                ),
            )
            for i in range(args.adapters)
        ]
        llm = LLM(
            str(model),
            device=mode.device,
            dtype=mode.dtype,
            max_loras=max(args.adapters, 1),
            max_lora_rank=args.rank,
            max_num_seqs=args.max_num_seqs or mode.max_num_seqs,
            kv_cache_bytes=mode.kv_cache_mb * 2**20,
            cuda_graphs=args.cuda_graphs,
        )
        prompts = [f"{i} " + "word " * (args.prompt_len // 5) for i in range(args.requests)]
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        with_adapters = [loras[i % len(loras)] for i in range(args.requests)] if loras else None
        for label, requests in (("base only", None), (f"{args.adapters} adapters", with_adapters)):
            llm.generate(prompts, params, requests)  # warm-up: compiles, loads adapters
            steps: list[float] = []
            engine_step = llm.engine.step

            def timed_step(_step=engine_step, _steps=steps):
                out = _step()
                _steps.append(llm.engine.last_step.seconds)
                return out

            llm.engine.step = timed_step
            if args.parts:
                print_parts(llm, prompts, params, requests, label)
                llm.engine.step = engine_step
                continue
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            outs = llm.generate(prompts, params, requests)
            profiler.disable()
            elapsed = time.perf_counter() - start
            llm.engine.step = engine_step
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
            print(
                f"\n### {label}: {tokens / elapsed:,.0f} tokens/s, {len(steps)} steps, "
                f"mean step {1000 * sum(steps) / len(steps):.2f} ms "
                f"(median {1000 * sorted(steps)[len(steps) // 2]:.2f} ms)"
            )
            print(text.getvalue())


def print_parts(llm, prompts, params, requests, label: str) -> None:
    """Median wall time per step of the engine's parts, without a profiler's overhead. On
    CUDA the launch only queues work; on the CPU it includes the model's compute, shown
    apart (``model forward`` and ``logits``) so the host's share can be read off."""
    engine = llm.engine
    parts = {
        "read back (_read_back)": (engine, "_read_back"),
        "schedule": (engine.scheduler, "schedule"),
        "launch (_launch)": (engine, "_launch"),
        "  of which model forward": (engine.runner.model, "forward"),
        "  of which logits": (engine.runner.model, "compute_logits"),
        "detokenize, stops, outputs (_emit)": (engine, "_emit"),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}

    def timed(fn, out):
        def call(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                out.append(time.perf_counter() - start)

        return call

    for name, (obj, attr) in parts.items():
        setattr(obj, attr, timed(getattr(obj, attr), times[name]))
    try:
        llm.generate(prompts, params, requests)
    finally:
        for obj, attr in parts.values():
            delattr(obj, attr)  # back to the class's method
    print(f"\n### {label}: median ms per call, decode steps included")
    for name, values in times.items():
        values = sorted(values)
        median = 1000 * values[len(values) // 2] if values else 0.0
        print(f"{name:40s} {median:8.3f}  ({len(values)} calls)")


if __name__ == "__main__":
    main()
