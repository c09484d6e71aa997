"""Engine tokens/s with pipelined steps vs steps read back at once, in one run.

    python benchmarks/bench_pipelining.py --gpu --cuda-graphs     # Llama-3.2-1B shape, bf16
    python benchmarks/bench_pipelining.py --requests 32           # tiny model on the CPU

A pipelined engine (the default on CUDA) schedules and queues step N+1 before it reads
step N back, so that its host work runs while the GPU computes. The same engine runs the same
workload (the adapter suite's: zipf:1.0 over ``--adapters`` adapters, EOS ignored) both
ways in alternating rounds; the best round of each is kept. On the CPU the forward blocks,
so the ratio there is about 1.0x: it only shows that the script runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="Llama-3.2-1B shape, bf16, CUDA")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best kept")
    ap.add_argument("--cuda-graphs", action="store_true", help="decode steps from CUDA graphs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(BENCH_DIR))
    import torch
    from run_all import (
        CPU,
        GPU,
        adapter_workload,
        machine_line,
        mode_llm,
        require_cuda,
        timed_tokens,
    )

    from lorafleet.producer import LoRARequest
    from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model

    mode = GPU if args.gpu else CPU
    if args.gpu:
        require_cuda()
    shape = dict(mode.model_shape)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory(prefix="lorafleet-pipelining-") as tmp:
        root = Path(tmp)
        dtype = getattr(torch, mode.dtype)
        model = build_random_model(root / "model", "llama", seed=1, dtype=dtype, **shape)
        loras = []
        for i in range(args.adapters):
            path = build_random_adapter(
                model, root / f"a{i}", rank=mode.rank, seed=i, target_modules=mode.targets
            )
            loras.append(LoRARequest(f"a{i}", i + 1, str(path)))
        llm = mode_llm(model, mode, args, max_loras=args.adapters)
        prompts, params, picks = adapter_workload(args.adapters, mode, args)
        requests = [None if a is None else loras[a] for a in picks]
        llm.generate(prompts, params, requests)  # warm-up: kernel compiles, graph captures
        if args.cuda_graphs and llm.engine.runner.graphs is None:
            raise SystemExit(f"CUDA graphs were turned off: {llm.engine.runner.graphs_error}")
        best = {True: 0.0, False: 0.0}
        for _ in range(args.rounds):
            for pipelined in best:
                llm.engine.pipelined = pipelined
                best[pipelined] = max(best[pipelined], timed_tokens(llm, prompts, params, requests))
    print(f"machine: {machine_line(mode, torch.get_num_threads())}")
    print(
        f"workload: {args.requests} requests, zipf:1.0 over {args.adapters} adapters (rank "
        f"{mode.rank}), prompts {mode.prompt_len}, {mode.output_len} output tokens, "
        f"{mode.dtype} {mode.device}{', CUDA graphs' if args.cuda_graphs else ''}; "
        f"best of {args.rounds} alternating rounds"
    )
    print(f"pipelined steps  : {best[True]:10,.0f} tokens/s")
    print(f"steps read back  : {best[False]:10,.0f} tokens/s")
    print(f"ratio            : {best[True] / best[False]:10.2f}x")


if __name__ == "__main__":
    main()
