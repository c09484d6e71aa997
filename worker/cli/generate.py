"""``lorafleet generate``: prompts through the queue, to running workers or to a worker
started for the command.

Output: one request prints its text alone; several print a header line per request,
``[adapter] prompt``, with the text below it indented by two spaces, so a text of several
lines is never mistaken for the next request. ``--json`` prints one JSON object per request
and line instead, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import msgspec

from lorafleet.producer.client import URL_ENV
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams
from lorafleet.producer.usage import TENANT_RULE, tenant_problem
from lorafleet.worker.cli.adapters import parse_lora_flags
from lorafleet.worker.cli.engine_flags import add_engine_flags
from lorafleet.worker.cli.errors import UsageError
from lorafleet.worker.local.fleet import local_fleet, local_worker_config, model_arg

INDENT = "  "


@dataclass(frozen=True)
class _Request:
    prompt: str
    lora: LoRARequest | None

    @property
    def label(self) -> str:
        return self.lora.lora_name if self.lora else "(base)"


NAME = "generate"
HELP = "generate through the queue"
DESCRIPTION = (
    "Submit prompts (arguments, or one per line on stdin) and print the outputs. "
    f"With --redis-url (or ${URL_ENV}) running workers serve them; otherwise --model "
    "starts an embedded Redis and a worker for this command. Sampling defaults here "
    "are greedy and 64 tokens (SamplingParams' own are temperature 1.0, 16 tokens)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompts (default: lines of stdin)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="adapter to run every prompt with; repeat to compare adapters (each NAME once; "
        "PATH as the workers see it)",
    )
    p.add_argument("--base", action="store_true", help="with --lora, also run the base model")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message: the worker applies the model's chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat, a system message first")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        help="tokens to generate at most (default 64; SamplingParams' default is 16)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 is greedy (default 0; SamplingParams' default is 1.0)",
    )
    p.add_argument(
        "--tenant",
        help=f"who the requests run for: metered and limited under this name ({TENANT_RULE})",
    )
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--json", action="store_true", help="one JSON object per request and line")
    p.add_argument("--redis-url", help=f"Redis of running workers [{URL_ENV}]")
    p.add_argument("--queue", help="queue name (default lorafleet:queue) [LORAFLEET_QUEUE]")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for results (default 300)"
    )
    local = p.add_argument_group("a worker for this command (without --redis-url)")
    local.add_argument(
        "--model",
        help="model folder or catalog name (e.g. smollm2) [LORAFLEET_MODEL]",
    )
    add_engine_flags(local)
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks with errors")


def run(args: argparse.Namespace) -> int:
    if args.system and not args.chat:
        raise UsageError("--system needs --chat")
    if args.stream and args.json:
        raise UsageError("--stream and --json do not go together: pick one")
    if (problem := tenant_problem(args.tenant)) is not None:
        raise UsageError(f"--tenant: {problem}")
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UsageError("no prompts (pass them as arguments or on stdin)")
    loras = parse_lora_flags(args.lora)
    choices: list[LoRARequest | None] = [*loras, None] if args.base or not loras else list(loras)
    requests = [_Request(p, lora) for p in prompts for lora in choices]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    queue = args.queue or os.environ.get("LORAFLEET_QUEUE") or None
    url = args.redis_url or os.environ.get(URL_ENV)
    if url:
        return _generate(url, queue, requests, params, args)
    if not (args.model or os.environ.get("LORAFLEET_MODEL")):
        raise UsageError(
            f"pass --redis-url (or set {URL_ENV}) to use running workers, or --model to "
            "start a worker for this command"
        )
    roots = tuple(sorted({os.path.dirname(lora.lora_path) for lora in loras}))
    config = local_worker_config(
        flags={
            "model": model_arg(args.model),
            "device": args.device,
            "max_model_len": args.max_model_len,
            "kv_cache_mb": args.kv_cache_mb,
        },
        computed={"adapter_roots": roots or None, "queue": queue},
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
    headers = len(requests) > 1 and not args.json
    with SyncClient(url, **({"queue_name": queue} if queue else {})) as client:
        handles = []
        for r in requests:
            content = (
                {"messages": _messages(r.prompt, args.system)}
                if args.chat
                else {"prompt": r.prompt}
            )
            handles.append(
                client.submit(
                    sampling_params=params, lora_request=r.lora, tenant=args.tenant, **content
                )
            )
        for request, handle in zip(requests, handles, strict=True):
            if headers:
                print(f"[{request.label}] {request.prompt}", flush=True)
            indent = INDENT if headers else ""
            try:
                if args.stream:
                    _print_stream(handle.stream(), indent)
                elif args.json:
                    print(json.dumps(_json(request, handle.result(timeout=args.timeout))))
                else:
                    text = handle.result(timeout=args.timeout).outputs[0].text
                    print(indent + text.replace("\n", "\n" + indent), flush=True)
            except LoraFleetError as e:
                failed += 1
                if args.json:
                    print(json.dumps(_json(request, error=e)))
                else:
                    print(f"{indent}error[{e.code}]: {e.message}", flush=True)
    return 1 if failed else 0


def _print_stream(deltas, indent: str) -> None:
    print(indent, end="", flush=True)
    for delta in deltas:
        print(delta.replace("\n", "\n" + indent), end="", flush=True)
    print()


def _json(
    request: _Request, output: RequestOutput | None = None, error: LoraFleetError | None = None
) -> dict:
    entry: dict = {"prompt": request.prompt, "adapter": request.lora and request.lora.lora_name}
    if error is not None:
        entry["error"] = {"code": error.code, "message": error.message}
        return entry
    completion = output.outputs[0]
    entry.update(
        text=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=len(output.prompt_token_ids),
        output_tokens=len(completion.token_ids),
        job_id=output.request_id,
    )
    if output.usage is not None:
        entry["usage"] = msgspec.to_builtins(output.usage)
    return entry
