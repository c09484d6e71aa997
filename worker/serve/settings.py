"""Worker configuration from ``LORAFLEET_*`` environment variables.

``VARIABLES`` is the single list of settings: the environment parser, the ``lorafleet
worker`` flags and the documentation table all come from it. The engine's settings are
``EngineConfig``'s own fields (``Variable.engine`` names the field, ``scale`` the unit: a
variable in MiB for a field in bytes), checked by ``EngineConfig``'s own rules; a worker only
adds the settings of the queue worker around it. A bad value stops the worker at start with
a message naming every bad variable (or the flag, when one was typed). Nothing here imports
torch or the job stack (``lorafleet.worker.serve.worker_settings`` builds arq's settings).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from arq.connections import RedisSettings
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lorafleet.producer.client import DEFAULT_URL, redact_url
from lorafleet.producer.keys import DEFAULT_QUEUE
from lorafleet.producer.ledger import DEFAULT_BUCKET_S, DEFAULT_RETENTION_S, ledger_problems
from lorafleet.producer.stream import DEFAULT_MAXLEN, DEFAULT_TTL_S
from lorafleet.worker.engine.config import EngineConfig, check, describe
from lorafleet.worker.model.catalog import catalog_names, find_model
from lorafleet.worker.serve.logs import LOG_FORMATS
from lorafleet.worker.serve.redis_outage import OutageRetry
from lorafleet.worker.serve.redis_url import redis_settings_from_url

MIB = 2**20


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ConfigError(ValueError):
    """The worker configuration is invalid; the message lists every problem."""


@dataclass(frozen=True)
class Variable:
    """One setting: its environment variable, its name on ``WorkerConfig`` (and as a flag),
    its kind and description; ``engine``: the ``EngineConfig`` field it sets (None: a
    setting of the queue worker), ``scale`` times the variable's value."""

    env: str
    field: str
    kind: str  # "str" | "int" | "float" | "bool" | "paths"
    help: str
    engine: str | None = None
    scale: int = 1

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


VARIABLES: tuple[Variable, ...] = (
    Variable("LORAFLEET_MODEL", "model", "str", "Hugging Face model folder, or a catalog name such as `smollm2` (prepared on first use; see `lorafleet prepare-model --list`). Required.", engine="model"),
    Variable("LORAFLEET_DEVICE", "device", "str", "`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`.", engine="device"),
    Variable("LORAFLEET_DTYPE", "dtype", "str", "`auto` (the model's), `float32`, `float16`, `bfloat16`.", engine="dtype"),
    Variable("LORAFLEET_MAX_LORAS", "max_loras", "int", "Adapters resident on the device at once (GPU slots).", engine="max_loras"),
    Variable("LORAFLEET_MAX_CPU_LORAS", "max_cpu_loras", "int", "Adapters cached in host memory (default max(max_loras, 32)).", engine="max_cpu_loras"),
    Variable("LORAFLEET_MAX_LORA_RANK", "max_lora_rank", "int", "Largest adapter rank accepted.", engine="max_lora_rank"),
    Variable("LORAFLEET_MAX_NUM_SEQS", "max_num_seqs", "int", "Requests in one engine batch.", engine="max_num_seqs"),
    Variable("LORAFLEET_MAX_MODEL_LEN", "max_model_len", "int", "Prompt + output token limit (default: the model's, lowered with a warning to what the KV cache holds).", engine="max_model_len"),
    Variable("LORAFLEET_ENGINE_THREADS", "engine_threads", "int", "CPU threads of the engine process's torch (default: all cores but one, which the worker's event loop keeps).", engine="num_threads"),
    Variable("LORAFLEET_ENGINE_STALL_TIMEOUT", "engine_stall_timeout", "float", "Seconds the engine process may go without finishing a step while requests wait on it; past that it counts as hung, is killed and the worker exits so its jobs run elsewhere (0: never)."),
    Variable("LORAFLEET_CUDA_GRAPHS", "cuda_graphs", "bool", "Replay decode steps from captured CUDA graphs (`1`/`0`; CUDA only, off by default until measured on a GPU).", engine="cuda_graphs"),
    Variable("LORAFLEET_PIPELINED", "pipelined", "bool", "On CUDA, queue each engine step before reading the previous one back, so host work overlaps the GPU's (`1`/`0`, default on; `0` reads every step back at once).", engine="pipelined"),
    Variable("LORAFLEET_KV_CACHE_MB", "kv_cache_mb", "int", "Memory for the paged KV cache, MiB (default: sized from the device: see LORAFLEET_GPU_MEMORY_UTILIZATION; on the CPU 25% of the available RAM, at most 4 GiB).", engine="kv_cache_bytes", scale=MIB),
    Variable("LORAFLEET_GPU_MEMORY_UTILIZATION", "gpu_memory_utilization", "float", "Share of the GPU's memory this worker's engine may use for weights, activations and KV cache (default 0.9).", engine="gpu_memory_utilization"),
    Variable("LORAFLEET_ADAPTER_ROOTS", "adapter_roots", "paths", "Folders adapters may be loaded from, `:`-separated (unset: no local adapters; `/` allows any path).", engine="adapter_roots"),
    Variable("LORAFLEET_HUB", "hub", "str", "Adapters named by a hub id (`org/name`): `off`, `offline` (local hub cache only) or `online` (download).", engine="hub"),
    Variable("LORAFLEET_HUB_CACHE", "hub_cache", "str", "Hub cache folder (default: huggingface_hub's, `$HF_HUB_CACHE`).", engine="hub_cache_dir"),
    Variable("LORAFLEET_MAX_ADAPTER_MB", "max_adapter_mb", "int", "Largest adapter weights file accepted, MiB.", engine="max_adapter_bytes", scale=MIB),
    Variable("LORAFLEET_ADAPTER_FAILURE_TTL", "adapter_failure_ttl", "float", "Seconds an adapter that failed to load is refused without touching the disk (0: always retry).", engine="adapter_failure_ttl"),
    Variable("LORAFLEET_MERGE_AFTER_STEPS", "merge_after_steps", "int", "On the CPU in float32: a stream whose steps all ran on one adapter for this many steps in a row runs on the weights merged with it, as fast as the base model (memory: one more copy of the LoRA linears' weights, allocated at start-up; off with a warning when that would take over half the RAM left after the KV cache). 0: never merge.", engine="merge_after_steps"),
    Variable("LORAFLEET_MAX_PROMPT_CHARS", "max_prompt_chars", "int", "Longest prompt accepted, in characters, checked before tokenizing (default 16 x max_model_len)."),
    Variable("LORAFLEET_REDIS_URL", "redis_url", "str", "Redis to take jobs from (`redis://`, `rediss://`, `unix://`)."),
    Variable("LORAFLEET_QUEUE", "queue", "str", "arq queue name; producers must use the same."),
    Variable("LORAFLEET_METRICS_PORT", "metrics_port", "int", "Port of the Prometheus `/metrics` endpoint (0: off); one per worker on a host."),
    Variable("LORAFLEET_METRICS_MAX_ADAPTERS", "metrics_max_adapters", "int", "Busiest adapters named in the metrics' `adapter` label; the rest count as `other`."),
    Variable("LORAFLEET_METRICS_MAX_TENANTS", "metrics_max_tenants", "int", "Busiest tenants named in the metrics' `tenant` label; the rest count as `other`."),
    Variable("LORAFLEET_JOB_TIMEOUT", "job_timeout", "float", "Seconds one job may run before arq cancels it."),
    Variable("LORAFLEET_MAX_JOBS", "max_jobs", "int", "Jobs taken from the queue at once (default 2 x max_num_seqs, at least max_num_seqs)."),
    Variable("LORAFLEET_POLL_DELAY", "poll_delay", "float", "Seconds between queue polls when idle."),
    Variable("LORAFLEET_KEEP_RESULT", "keep_result", "float", "Seconds arq keeps a job's result."),
    Variable("LORAFLEET_MAX_TRIES", "max_tries", "int", "Runs of one job before arq gives up (re-runs follow worker crashes)."),
    Variable("LORAFLEET_HEARTBEAT_TTL", "heartbeat_ttl", "float", "Seconds after which a dead worker's jobs run again elsewhere (its claims are refreshed every third of it)."),
    Variable("LORAFLEET_DRAIN_TIMEOUT", "drain_timeout", "float", "On SIGTERM, seconds running jobs get to finish before they go back to the queue."),
    Variable("LORAFLEET_AFFINITY", "affinity", "bool", "Route by adapter across the fleet: take jobs for adapters this worker holds or is a home of first, others' after --steal-after (off: every job as it comes, random routing)."),
    Variable("LORAFLEET_STEAL_AFTER", "steal_after", "float", "Seconds a job homed on other workers waits for them before this worker takes it (an idle worker takes it at once)."),
    Variable("LORAFLEET_PREFETCH", "prefetch", "bool", "Read the adapters of jobs waiting in the queue for this worker into its CPU cache, in the background while the engine steps.", engine="prefetch_adapters"),
    Variable("LORAFLEET_STREAM_MAXLEN", "stream_maxlen", "int", "Entries kept per token stream (approximate cap)."),
    Variable("LORAFLEET_STREAM_TTL", "stream_ttl", "int", "Seconds a token stream lives after its last write."),
    Variable("LORAFLEET_WORKER_NAME", "name", "str", "Name in logs and in `lorafleet:workers` (default host:pid)."),
    Variable("LORAFLEET_METERING", "metering", "bool", "Record every completed job's usage in the Redis ledger, once per job id (`1`/`0`, default on; see `lorafleet usage`)."),
    Variable("LORAFLEET_USAGE_BUCKET", "usage_bucket", "int", "Seconds of one ledger bucket (default 3600: hourly counters); every worker on a Redis must use the same."),
    Variable("LORAFLEET_USAGE_RETENTION", "usage_retention", "int", "Seconds a ledger bucket is kept after it ends (default 2592000: 30 days)."),
    Variable("LORAFLEET_LOG_FORMAT", "log_format", "str", "`text` (default) or `json`: one JSON object per line, with job_id, adapter and code fields on job lines."),
)  # fmt: skip

#: The worker's own settings' variables, and the engine's, by ``WorkerConfig`` name.
_WORKER_VARS = {v.field: v for v in VARIABLES if v.engine is None}
_ENGINE_VARS = {v.field: v for v in VARIABLES if v.engine is not None}
#: What a worker's engine differs in from ``EngineConfig``'s defaults: a worker loads no
#: local adapter unless told which folders it may read.
_WORKER_ENGINE_DEFAULTS: dict[str, Any] = {"adapter_roots": ()}


@dataclass(frozen=True)
class WorkerConfig:
    """A validated worker configuration (build it with ``from_env`` or ``create``): the
    engine's (``engine``) and the queue worker's. The engine's settings read as attributes
    too, by their variables' names and units (``config.max_loras``, ``config.kv_cache_mb``).
    """

    engine: EngineConfig
    engine_stall_timeout: float = 120.0
    max_prompt_chars: int | None = None
    redis_url: str = DEFAULT_URL
    queue: str = DEFAULT_QUEUE
    metrics_port: int = 0
    metrics_max_adapters: int = 20
    metrics_max_tenants: int = 20
    job_timeout: float = 600.0
    max_jobs: int | None = None
    poll_delay: float = 0.01
    keep_result: float = 3600.0
    max_tries: int = 5
    heartbeat_ttl: float = 15.0
    drain_timeout: float = 25.0
    affinity: bool = True
    steal_after: float = 0.5
    stream_maxlen: int = DEFAULT_MAXLEN
    stream_ttl: int = DEFAULT_TTL_S
    name: str = ""
    metering: bool = True
    usage_bucket: int = DEFAULT_BUCKET_S
    usage_retention: int = DEFAULT_RETENTION_S
    log_format: str = "text"

    def __getattr__(self, name: str) -> Any:
        var = _ENGINE_VARS.get(name)
        if var is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(self.engine, var.engine)
        return value // var.scale if var.scale != 1 and value is not None else value

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, flags: frozenset[str] = frozenset()
    ) -> WorkerConfig:
        """Read ``LORAFLEET_*`` variables (unset or empty = default). Raises ``ConfigError``.

        ``flags``: the settings (``WorkerConfig`` names) the user typed as ``lorafleet``
        flags (then in ``environ``); problems with them name the flag, not the variable."""
        environ = os.environ if environ is None else environ
        labels = {v.field: v.flag if v.field in flags else v.env for v in VARIABLES}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for var in VARIABLES:
            raw = environ.get(var.env, "").strip()
            if raw:
                try:
                    values[var.field] = _PARSERS[var.kind](raw)
                except ValueError:
                    kind = _KIND_NAMES[var.kind]
                    problems.append(f"{labels[var.field]} must be {kind}, got {raw!r}")
        if "model" not in values:
            problems.append(
                "LORAFLEET_MODEL is not set (or --model): name the Hugging Face model folder "
                f"or catalog model ({', '.join(catalog_names())}) to serve"
            )
        bad = {p.split(" ", 1)[0] for p in problems}
        kept = {k: v for k, v in values.items() if labels[k] not in bad}
        return cls._build(kept, labels, problems, check_model="model" in values)

    @classmethod
    def create(cls, **values: Any) -> WorkerConfig:
        """Build and validate from settings by their ``WorkerConfig`` names (``model=``,
        ``max_loras=``, ``kv_cache_mb=``, ``redis_url=``...). Raises ``ConfigError`` listing
        every problem, each setting named as the caller typed it."""
        unknown = sorted(set(values) - {v.field for v in VARIABLES})
        if unknown:
            raise TypeError(f"unknown worker settings {unknown}")
        return cls._build(values, {v.field: v.field for v in VARIABLES}, [], check_model=True)

    @classmethod
    def _build(
        cls,
        values: Mapping[str, Any],
        labels: Mapping[str, str],
        problems: list[str],
        *,
        check_model: bool,
    ) -> WorkerConfig:
        engine_values = dict(_WORKER_ENGINE_DEFAULTS)
        engine_values["model"] = values.get("model", "") or ""
        for name, var in _ENGINE_VARS.items():
            if name in values:
                value = values[name]
                engine_values[var.engine] = value * var.scale if value is not None else None
        worker_values = {k: v for k, v in values.items() if k in _WORKER_VARS}
        engine_labels = {v.engine: labels[v.field] for v in _ENGINE_VARS.values()}
        engine_problems = [p for p in check(engine_values) if check_model or p[0] != "model"]
        problems = problems + [describe(p, engine_labels) for p in engine_problems]
        defaults = {f.name: f.default for f in fields(cls) if f.name != "engine"}
        worker = {**defaults, **worker_values}
        problems += _worker_problems(worker, engine_values, labels, check_model=check_model)
        if problems:
            raise ConfigError(_format(problems))
        return cls(engine=EngineConfig(**engine_values), **worker_values)

    @property
    def worker_name(self) -> str:
        return self.name or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def jobs_at_once(self) -> int:
        return self.max_jobs or 2 * self.engine.max_num_seqs

    def engine_config(self) -> EngineConfig:
        """The engine's settings as the engine process gets them: torch's threads default to
        all cores but one, which the worker's event loop keeps (``device`` ``auto`` is
        resolved by the engine process)."""
        threads = self.engine.num_threads or max(1, _usable_cores() - 1)
        return replace(self.engine, num_threads=threads)

    def redis_settings(self) -> RedisSettings:
        """arq connection settings that ride out a Redis outage instead of exiting.

        Commands retry forever with a capped backoff, so a restart of Redis stalls the
        worker (and its jobs' stream writes) until Redis is back, then it carries on. At
        start-up the worker waits for Redis the same way. ``OSError`` is in the list because
        redis-py retries a failed reconnect (connection refused) only for listed errors, and
        it reconnects outside a command's own retry loop.
        """
        settings = redis_settings_from_url(self.redis_url)
        settings.conn_timeout = 5
        settings.conn_retries = 2**31
        settings.conn_retry_delay = 1
        settings.retry = OutageRetry(
            ExponentialBackoff(cap=1.0, base=0.02), redact_url(self.redis_url)
        )
        settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
        return settings

    def to_env(self) -> dict[str, str]:
        """The ``LORAFLEET_*`` variables that reproduce this configuration (non-defaults)."""
        env: dict[str, str] = {}
        for var in VARIABLES:
            value = getattr(self, var.field)
            if var.field == "model" or value != _default(var, self):
                env[var.env] = os.pathsep.join(value) if var.kind == "paths" else str(value)
        return env


def default_of(var: Variable) -> Any:
    """A setting's default, in its variable's unit (None: none, or derived at start)."""
    if var.engine is None:
        return next(f.default for f in fields(WorkerConfig) if f.name == var.field)
    value = {**EngineConfig.defaults(), **_WORKER_ENGINE_DEFAULTS}.get(var.engine)
    return value // var.scale if var.scale != 1 and value is not None else value


def _default(var: Variable, config: WorkerConfig) -> Any:
    """``default_of(var)`` in ``config`` (``max_cpu_loras``'s derives from ``max_loras``)."""
    if var.engine == "max_cpu_loras":
        return max(config.engine.max_loras, 32)
    return default_of(var)


def _worker_problems(
    worker: Mapping[str, Any],
    engine: Mapping[str, Any],
    labels: Mapping[str, str],
    *,
    check_model: bool,
) -> list[str]:
    """The queue worker's own checks, and the model folder's (before any engine starts)."""
    problems = []

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            problems.append(f"{labels[name]} {message}, got {worker[name]!r}")

    model = Path(engine["model"]).expanduser()
    if check_model and (find_model(engine["model"]) is None or model.is_dir()):
        if not model.is_dir():
            problems.append(
                f"{labels['model']} must be an existing model folder or a catalog name "
                f"({', '.join(catalog_names())}), got {engine['model']!r}"
            )
        elif not (model / "config.json").is_file():
            problems.append(f"{labels['model']} has no config.json, got {engine['model']!r}")
    for name in ("max_tries", "stream_maxlen"):
        need(worker[name] >= 1, name, "must be >= 1")
    for name in ("max_jobs",):
        need(worker[name] is None or worker[name] >= 1, name, "must be >= 1")
    need(0 <= worker["metrics_port"] < 65536, "metrics_port", "must be a port number (0: off)")
    need(worker["metrics_max_adapters"] >= 0, "metrics_max_adapters", "must be >= 0")
    need(worker["metrics_max_tenants"] >= 0, "metrics_max_tenants", "must be >= 0")
    need(worker["job_timeout"] > 0, "job_timeout", "must be > 0")
    need(worker["engine_stall_timeout"] >= 0, "engine_stall_timeout", "must be >= 0 (0: never)")
    need(0 < worker["poll_delay"] <= 5, "poll_delay", "must be in (0, 5] seconds")
    need(worker["keep_result"] > 0, "keep_result", "must be > 0")
    need(worker["stream_ttl"] >= 1, "stream_ttl", "must be >= 1")
    need(
        worker["max_prompt_chars"] is None or worker["max_prompt_chars"] >= 1,
        "max_prompt_chars",
        "must be >= 1",
    )
    # Below a second, a beat every third of it is too easily missed under load.
    need(worker["heartbeat_ttl"] >= 1, "heartbeat_ttl", "must be >= 1 second")
    need(worker["drain_timeout"] >= 0, "drain_timeout", "must be >= 0")
    # Past a heartbeat TTL a dead home would be noticed first: a longer wait buys nothing.
    need(
        0 <= worker["steal_after"] <= max(worker["heartbeat_ttl"], 1),
        "steal_after",
        f"must be in [0, heartbeat_ttl ({worker['heartbeat_ttl']:g})] seconds",
    )
    problems += [f"{labels[name]} {problem}" for name, problem in ledger_problems(worker).items()]
    problems += _redis_url_problems(worker["redis_url"], labels["redis_url"])
    need(bool(worker["queue"]), "queue", "cannot be empty")
    need(worker["log_format"] in LOG_FORMATS, "log_format", f"must be {' or '.join(LOG_FORMATS)}")
    for root in engine.get("adapter_roots") or ():
        if not Path(root).is_dir():
            problems.append(f"{labels['adapter_roots']} names {root!r}, which is not a folder")
    seqs = engine.get("max_num_seqs", EngineConfig.defaults()["max_num_seqs"])
    if worker["max_jobs"] is not None and isinstance(seqs, int) and worker["max_jobs"] < seqs:
        problems.append(
            f"{labels['max_jobs']} ({worker['max_jobs']}) must be >= {labels['max_num_seqs']} "
            f"({seqs}), or the engine never sees a full batch"
        )
    return problems


def _redis_url_problems(url: str, label: str) -> list[str]:
    # The URL may hold a password: name it redacted.
    if url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        return [f"{label} must start with redis://, rediss:// or unix://, got {redact_url(url)!r}"]
    try:
        redis_settings_from_url(url)
    except ValueError as e:
        return [f"{label} {redact_url(url)!r}: {e}"]
    return []


def _paths(raw: str) -> tuple[str, ...]:
    return tuple(str(Path(p).expanduser().resolve()) for p in raw.split(os.pathsep) if p.strip())


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": _bool,
    "paths": _paths,
}
_KIND_NAMES = {
    "str": "text",
    "int": "an integer",
    "float": "a number",
    "bool": "1 or 0 (true/false, yes/no, on/off)",
    "paths": "a list of folders",
}


def _format(problems: list[str]) -> str:
    return "invalid lorafleet worker configuration:\n  - " + "\n  - ".join(problems)
