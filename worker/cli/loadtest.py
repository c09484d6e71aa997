"""``lorafleet loadtest``: drive running workers, or a worker started for the run, with a
synthetic workload; report throughput, goodput and latency percentiles."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from lorafleet.worker.cli.adapters import folder_lora
from lorafleet.worker.cli.errors import UsageError
from lorafleet.worker.cli.local_worker import (
    add_engine_flags,
    local_fleet,
    local_worker_config,
    model_arg,
)

URL_ENV = "LORAFLEET_REDIS_URL"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lorafleet.producer import loadtest

    p = sub.add_parser(
        "loadtest",
        help="drive workers with a synthetic workload; report throughput and latency",
        description=(
            "Send a workload through the queue (open loop at --rate, or closed loop with "
            "--concurrency) and report throughput, goodput and queue wait / TTFT / "
            "inter-token / end-to-end percentiles, overall and per adapter. With "
            f"--redis-url (or ${URL_ENV}) running workers serve it; otherwise an embedded "
            "Redis and one worker start for the run, on --model and --adapters-dir (default: "
            "the shipped demo model and adapters)."
        ),
    )
    fleet = p.add_argument_group("workers")
    fleet.add_argument("--redis-url", help=f"Redis of running workers [{URL_ENV}]")
    fleet.add_argument("--queue", help="queue name (default lorafleet:queue) [LORAFLEET_QUEUE]")
    fleet.add_argument(
        "--model",
        help="model folder or catalog name (e.g. smollm2) of the local worker (default: the "
        "demo model) [LORAFLEET_MODEL]",
    )
    fleet.add_argument(
        "--adapters-dir",
        help="folder whose subfolders are PEFT adapters, as the workers see it "
        "(default: the demo adapters)",
    )
    add_engine_flags(fleet)
    fleet.add_argument(
        "--max-loras",
        type=int,
        help="local worker: adapter slots (default 4) [LORAFLEET_MAX_LORAS]",
    )
    fleet.add_argument(
        "--max-cpu-loras",
        type=int,
        help="local worker: adapters in host memory (default max(max_loras, 32)) "
        "[LORAFLEET_MAX_CPU_LORAS]",
    )
    fleet.add_argument(
        "--max-num-seqs",
        type=int,
        help="local worker: requests per batch (default 128) [LORAFLEET_MAX_NUM_SEQS]",
    )
    fleet.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="local worker: decode steps from CUDA graphs [LORAFLEET_CUDA_GRAPHS]",
    )
    loadtest.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks with errors")
    p.set_defaults(run=run)


def _assets(args: argparse.Namespace) -> tuple[str | None, list[Path]]:
    """(model folder or catalog name, adapter folders): the flags' or the shipped demo's."""
    model = model_arg(args.model or os.environ.get("LORAFLEET_MODEL"))
    if args.adapters_dir:
        root = Path(args.adapters_dir).resolve()
        adapters = sorted(p.parent for p in root.glob("*/adapter_config.json"))
        if not adapters:
            raise UsageError(f"no PEFT adapter folders in {root} (--adapters-dir)")
    elif model is None:
        from lorafleet.worker import demo_assets

        model = str(demo_assets.demo_model_dir())
        adapters = list(demo_assets.demo_adapters().values())
    elif args.base_share < 1:
        raise UsageError(
            "--model without --adapters-dir has no adapters to mix: pass --adapters-dir, or "
            "--base-share 1 for the base model alone"
        )
    else:
        adapters = []
    if args.num_adapters is not None:
        if not 0 <= args.num_adapters <= len(adapters):
            raise UsageError(
                f"--num-adapters {args.num_adapters}, but {len(adapters)} adapters were found"
            )
        adapters = adapters[: args.num_adapters]
    return model, adapters


def run(args: argparse.Namespace) -> int:
    from lorafleet.producer import loadtest
    from lorafleet.producer.client import redact_url

    model, adapters = _assets(args)
    loras = [folder_lora(p) for p in adapters]
    try:
        spec = loadtest.spec_from_args(args, loras)  # before anything starts
    except ValueError as e:
        raise UsageError(str(e)) from None
    url = args.redis_url or os.environ.get(URL_ENV)
    if url:
        from lorafleet.producer.keys import DEFAULT_QUEUE

        queue = args.queue or os.environ.get("LORAFLEET_QUEUE") or DEFAULT_QUEUE
        setup = {"redis": redact_url(url), "queue": queue, "workers": "running"}
        return loadtest.run_command(args, spec, url, queue, setup)
    config = local_worker_config(
        flags={
            "model": model,
            "device": args.device,
            "max_model_len": args.max_model_len,
            "kv_cache_mb": args.kv_cache_mb,
            "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "max_num_seqs": args.max_num_seqs,
            "cuda_graphs": 1 if args.cuda_graphs else None,
        },
        computed={
            "adapter_roots": tuple(sorted({str(p.parent) for p in adapters})) or None,
            "queue": args.queue or f"lorafleet:loadtest:{uuid.uuid4().hex[:8]}",
        },
    )
    print(f"starting an embedded Redis and a worker for {model} ...", file=sys.stderr, flush=True)
    with local_fleet(config, embedded_redis=True) as fleet:
        setup = {
            "redis": "embedded",
            "workers": 1,
            "model": str(model),
            "device": fleet.device,
            "max_loras": fleet.max_loras,
            "max_cpu_loras": fleet.max_cpu_loras,
            "max_num_seqs": fleet.max_num_seqs,
            "cuda_graphs": fleet.cuda_graphs,
        }
        return loadtest.run_command(args, spec, fleet.redis_url, fleet.queue, setup)
