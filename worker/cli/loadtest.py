"""``lorafleet loadtest``: drive running workers, or a worker started for the run, with a
synthetic workload; report throughput, goodput and latency percentiles.

The load test itself is ``lorafleet.producer.loadtest`` (a library, torch-free); this module
is its command: the flags, the local worker, a progress bar (rich) and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lorafleet.producer.loadreport import (
    SLO,
    build_report,
    format_summary,
    plot_report,
    require_matplotlib,
    write_json,
)
from lorafleet.producer.loadtest import WARMUP_TENANT, LoadCounts, LoadTestSpec, run_load_test
from lorafleet.producer.types import LoRARequest
from lorafleet.producer.usage import tenant_problem
from lorafleet.producer.workload import AdapterMix, Arrivals, Length, Prompts, Workload
from lorafleet.worker.cli.adapters import folder_lora
from lorafleet.worker.cli.engine_flags import add_engine_flags
from lorafleet.worker.cli.errors import UsageError
from lorafleet.worker.local.fleet import local_fleet, local_worker_config, model_arg

URL_ENV = "LORAFLEET_REDIS_URL"


NAME = "loadtest"
HELP = "drive workers with a synthetic workload; report throughput and latency"
DESCRIPTION = (
    "Send a workload through the queue (open loop at --rate, or closed loop with "
    "--concurrency) and report throughput, goodput and queue wait / TTFT / "
    "inter-token / end-to-end percentiles, overall and per adapter. With "
    f"--redis-url (or ${URL_ENV}) running workers serve it; otherwise an embedded "
    "Redis and one worker start for the run, on --model and --adapters-dir (default: "
    "the shipped demo model and adapters)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
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
        "--workers",
        type=int,
        default=1,
        help="local workers to start on the embedded Redis (default 1); with more than one "
        "the report adds what each did (jobs, adapter loads, steals; see docs/fleet.md)",
    )
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
    add_workload_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks with errors")


def _assets(args: argparse.Namespace) -> tuple[str | None, list[Path]]:
    """(model folder or catalog name, adapter folders): the flags' or the shipped demo's."""
    model = model_arg(args.model or os.environ.get("LORAFLEET_MODEL"))
    if args.adapters_dir:
        root = Path(args.adapters_dir).resolve()
        adapters = sorted(p.parent for p in root.glob("*/adapter_config.json"))
        if not adapters:
            raise UsageError(f"no PEFT adapter folders in {root} (--adapters-dir)")
    elif model is None:
        from lorafleet.worker.demo import demo_assets

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
    from lorafleet.producer.client import redact_url

    model, adapters = _assets(args)
    loras = [folder_lora(p) for p in adapters]
    try:
        spec = _spec_from_args(args, loras)  # before anything starts
    except ValueError as e:
        raise UsageError(str(e)) from None
    url = args.redis_url or os.environ.get(URL_ENV)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if url and args.workers != 1:
        raise UsageError("--workers starts local workers; with --redis-url the running ones serve")
    if url:
        from lorafleet.producer.keys import DEFAULT_QUEUE

        queue = args.queue or os.environ.get("LORAFLEET_QUEUE") or DEFAULT_QUEUE
        setup = {"redis": redact_url(url), "queue": queue, "workers": "running"}
        return _run_command(args, spec, url, queue, setup)
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
    what = "a worker" if args.workers == 1 else f"{args.workers} workers"
    print(f"starting an embedded Redis and {what} for {model} ...", file=sys.stderr, flush=True)
    with local_fleet(config, embedded_redis=True, workers=args.workers) as fleet:
        setup = {
            "redis": "embedded",
            "workers": args.workers,
            "model": str(model),
            "device": fleet.device,
            "max_loras": fleet.max_loras,
            "max_cpu_loras": fleet.max_cpu_loras,
            "max_num_seqs": fleet.max_num_seqs,
            "cuda_graphs": fleet.cuda_graphs,
        }
        status = _run_command(args, spec, fleet.redis_url, fleet.queue, setup)
        if args.workers > 1:
            from lorafleet.worker.local.fleet_view import format_fleet, read_fleet

            print("\nper worker:")
            print(format_fleet(read_fleet(fleet.redis_url, fleet.queue, after=time.time())))
        return status


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Load, workload, SLO and output flags of ``lorafleet loadtest``."""
    load = parser.add_argument_group("load (open loop by default)")
    how = load.add_mutually_exclusive_group()
    how.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="open loop: mean arrivals per second; 'inf' sends everything at once (default 10)",
    )
    how.add_argument(
        "--concurrency", type=int, help="closed loop: this many users, each waiting for its answer"
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 is Poisson, below 1 burstier (default 1)",
    )
    load.add_argument(
        "--num-requests", type=int, help="requests to send (default 200 unless --duration)"
    )
    load.add_argument(
        "--duration", type=float, help="stop sending after this many seconds (default: none)"
    )
    load.add_argument(
        "--warmup", type=int, default=8, help="unmeasured requests sent first (default 8)"
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="deadline of each request, seconds (default 300)",
    )
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--adapter-mix",
        default="uniform",
        help="identical, uniform, zipf[:ALPHA] or distinct (default uniform)",
    )
    work.add_argument("--num-adapters", type=int, help="use the first N adapters (default all)")
    work.add_argument(
        "--base-share",
        type=float,
        default=0.0,
        help="fraction of requests on the base model (default 0)",
    )
    work.add_argument(
        "--prompt-len",
        default="uniform:8:24",
        help="prompt length in characters: N or uniform:A:B (default uniform:8:24)",
    )
    work.add_argument("--prompts", metavar="FILE", help="draw prompts from FILE, one per line")
    work.add_argument(
        "--output-len", default="24", help="output tokens: N or uniform:A:B (default 24)"
    )
    work.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    work.add_argument(
        "--seed", type=int, default=0, help="seed of the workload and arrivals (default 0)"
    )
    work.add_argument(
        "--tenant",
        help="tenant of the measured requests, for metering and quotas (default none; the "
        f"warm-up's is {WARMUP_TENANT!r})",
    )
    slo = parser.add_argument_group(
        "SLOs for goodput (milliseconds): a request counts toward goodput when it meets all given"
    )
    slo.add_argument("--slo-ttft", type=float, metavar="MS", help="time to first token at most MS")
    slo.add_argument(
        "--slo-tpot",
        type=float,
        metavar="MS",
        help="time per output token (after the first) at most MS",
    )
    slo.add_argument("--slo-e2e", type=float, metavar="MS", help="end-to-end latency at most MS")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the full report (JSON) here")
    out.add_argument("--plot", metavar="PATH", help="write latency CDFs and throughput (PNG)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def _spec_from_args(args: argparse.Namespace, loras: Sequence[LoRARequest]) -> LoadTestSpec:
    """The ``LoadTestSpec`` the flags describe. Raises ``ValueError`` with a message for a
    bad value, an unreadable prompts file or a missing matplotlib, so call it before
    starting anything."""
    if (problem := tenant_problem(args.tenant)) is not None:
        raise ValueError(f"--tenant: {problem}")
    try:
        if args.plot:
            require_matplotlib()
        return _spec(args, loras)
    except (OSError, RuntimeError) as e:
        raise ValueError(str(e)) from None


def _spec(args: argparse.Namespace, loras: Sequence[LoRARequest]) -> LoadTestSpec:
    prompts = (
        Prompts.from_file(args.prompts) if args.prompts else Prompts(Length.parse(args.prompt_len))
    )
    workload = Workload(
        AdapterMix.parse(args.adapter_mix, len(loras), args.base_share),
        prompts,
        Length.parse(args.output_len),
        seed=args.seed,
    )
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 200
    return LoadTestSpec(
        workload,
        loras,
        arrivals=Arrivals(args.rate, args.burstiness),
        concurrency=args.concurrency,
        num_requests=num_requests,
        duration=args.duration,
        warmup=args.warmup,
        temperature=args.temperature,
        request_timeout=args.timeout,
        tenant=args.tenant,
    )


def _slo_from_args(args: argparse.Namespace) -> SLO:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000.0

    return SLO(ttft=seconds(args.slo_ttft), tpot=seconds(args.slo_tpot), e2e=seconds(args.slo_e2e))


def _run_command(
    args: argparse.Namespace, spec: LoadTestSpec, url: str, queue_name: str, setup: dict[str, Any]
) -> int:
    """Run ``spec`` (from ``_spec_from_args(args, ...)``) against ``url`` and print, write
    and plot the report as the flags ask. ``setup`` (model, worker settings...) is recorded
    in the report's config. Returns the exit status: 0 if every request succeeded, else 1."""
    slo = _slo_from_args(args)
    with _progress_bar(spec, quiet=args.quiet) as progress:
        records, elapsed = asyncio.run(
            run_load_test(url, spec, queue_name=queue_name, progress=progress)
        )
    config = {
        **setup,
        "mode": "closed" if spec.closed_loop else "open",
        "rate": None if math.isinf(spec.arrivals.rate) else spec.arrivals.rate,
        "burstiness": spec.arrivals.burstiness,
        "concurrency": spec.concurrency,
        "num_requests": spec.num_requests,
        "duration": spec.duration,
        "warmup": spec.warmup,
        "adapter_mix": args.adapter_mix,
        "base_share": args.base_share,
        "prompts": spec.workload.prompts.describe(),
        "output_len": args.output_len,
        "temperature": spec.temperature,
        "seed": args.seed,
        "request_timeout": spec.request_timeout,
        "tenant": spec.tenant,
        "warmup_tenant": WARMUP_TENANT,
        "adapters": [lora.lora_name for lora in spec.loras],
    }
    report = build_report(
        records,
        elapsed,
        description=f"{spec.describe()}; {spec.workload.describe()}",
        config=config,
        slo=slo,
    )
    print(format_summary(report))
    if args.json:
        write_json(report, args.json)
        print(f"\nreport: {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"figure: {args.plot}")
    return 0 if report.failed == 0 else 1


@contextlib.contextmanager
def _progress_bar(spec: LoadTestSpec, *, quiet: bool) -> Iterator[Callable | None]:
    """A progress bar on stderr for the measured run (redrawn in place on a terminal, its
    last state printed once otherwise); yields the callback ``run_load_test`` feeds."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        BarColumn(),
        MofNCompleteColumn() if spec.num_requests else TextColumn("{task.completed} done"),
        TextColumn(
            "ok {task.fields[ok]}  failed {task.fields[failed]}  in flight {task.fields[flight]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("requests", total=spec.num_requests, ok=0, failed=0, flight=0)

        def update(counts: LoadCounts) -> None:
            done = counts.ok + counts.failed
            bar.update(
                task, completed=done, ok=counts.ok, failed=counts.failed, flight=counts.sent - done
            )

        yield update
