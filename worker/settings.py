"""Worker configuration from ``LORAFLEET_*`` environment variables, and arq's settings.

``arq lorafleet.worker.WorkerSettings`` reads the environment when it looks the name up, so
a bad value stops the worker at start with a message naming every bad variable; nothing
here imports torch (the engine loads in arq's ``on_startup``). ``VARIABLES`` is the single
list of settings: the environment parser, the ``lorafleet worker`` flags and the
documentation table all come from it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from arq.connections import RedisSettings
from arq.worker import func
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lorafleet.producer.client import DEFAULT_URL, redact_url
from lorafleet.producer.codec import arq_deserialize, arq_serialize
from lorafleet.producer.keys import DEFAULT_QUEUE, GENERATE_FUNCTION
from lorafleet.producer.stream import DEFAULT_MAXLEN, DEFAULT_TTL_S
from lorafleet.worker import jobs
from lorafleet.worker.catalog import catalog_names, find_model
from lorafleet.worker.config import EngineConfig
from lorafleet.worker.hub import HUB_MODES
from lorafleet.worker.logs import LOG_FORMATS
from lorafleet.worker.redis_outage import OutageRetry
from lorafleet.worker.redis_url import redis_settings_from_url


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ConfigError(ValueError):
    """The worker configuration is invalid; the message lists every problem."""


@dataclass(frozen=True)
class Variable:
    """One setting: its environment variable, ``WorkerConfig`` field and description."""

    env: str
    field: str
    kind: str  # "str" | "int" | "float" | "bool" | "paths"
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


VARIABLES: tuple[Variable, ...] = (
    Variable("LORAFLEET_MODEL", "model", "str", "Hugging Face model folder, or a catalog name such as `smollm2` (prepared on first use; see `lorafleet prepare-model --list`). Required."),
    Variable("LORAFLEET_DEVICE", "device", "str", "`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`."),
    Variable("LORAFLEET_DTYPE", "dtype", "str", "`auto` (the model's), `float32`, `float16`, `bfloat16`."),
    Variable("LORAFLEET_MAX_LORAS", "max_loras", "int", "Adapters resident on the device at once (GPU slots)."),
    Variable("LORAFLEET_MAX_CPU_LORAS", "max_cpu_loras", "int", "Adapters cached in host memory (default max(max_loras, 32))."),
    Variable("LORAFLEET_MAX_LORA_RANK", "max_lora_rank", "int", "Largest adapter rank accepted."),
    Variable("LORAFLEET_MAX_NUM_SEQS", "max_num_seqs", "int", "Requests in one engine batch."),
    Variable("LORAFLEET_MAX_MODEL_LEN", "max_model_len", "int", "Prompt + output token limit (default: the model's, lowered with a warning to what the KV cache holds)."),
    Variable("LORAFLEET_ENGINE_THREADS", "engine_threads", "int", "CPU threads of the engine process's torch (default: all cores but one, which the worker's event loop keeps)."),
    Variable("LORAFLEET_ENGINE_STALL_TIMEOUT", "engine_stall_timeout", "float", "Seconds the engine process may go without finishing a step while requests wait on it; past that it counts as hung, is killed and the worker exits so its jobs run elsewhere (0: never)."),
    Variable("LORAFLEET_CUDA_GRAPHS", "cuda_graphs", "bool", "Replay decode steps from captured CUDA graphs (`1`/`0`; CUDA only, off by default until measured on a GPU)."),
    Variable("LORAFLEET_PIPELINED", "pipelined", "bool", "On CUDA, queue each engine step before reading the previous one back, so host work overlaps the GPU's (`1`/`0`, default on; `0` reads every step back at once)."),
    Variable("LORAFLEET_KV_CACHE_MB", "kv_cache_mb", "int", "Memory for the paged KV cache, MiB (default: sized from the device: see LORAFLEET_GPU_MEMORY_UTILIZATION; on the CPU 25% of the available RAM, at most 4 GiB)."),
    Variable("LORAFLEET_GPU_MEMORY_UTILIZATION", "gpu_memory_utilization", "float", "Share of the GPU's memory this worker's engine may use for weights, activations and KV cache (default 0.9)."),
    Variable("LORAFLEET_ADAPTER_ROOTS", "adapter_roots", "paths", "Folders adapters may be loaded from, `:`-separated (unset: no local adapters; `/` allows any path)."),
    Variable("LORAFLEET_HUB", "hub", "str", "Adapters named by a hub id (`org/name`): `off`, `offline` (local hub cache only) or `online` (download)."),
    Variable("LORAFLEET_HUB_CACHE", "hub_cache", "str", "Hub cache folder (default: huggingface_hub's, `$HF_HUB_CACHE`)."),
    Variable("LORAFLEET_MAX_ADAPTER_MB", "max_adapter_mb", "int", "Largest adapter weights file accepted, MiB."),
    Variable("LORAFLEET_ADAPTER_FAILURE_TTL", "adapter_failure_ttl", "float", "Seconds an adapter that failed to load is refused without touching the disk (0: always retry)."),
    Variable("LORAFLEET_MAX_PROMPT_CHARS", "max_prompt_chars", "int", "Longest prompt accepted, in characters, checked before tokenizing (default 16 x max_model_len)."),
    Variable("LORAFLEET_REDIS_URL", "redis_url", "str", "Redis to take jobs from (`redis://`, `rediss://`, `unix://`)."),
    Variable("LORAFLEET_QUEUE", "queue", "str", "arq queue name; producers must use the same."),
    Variable("LORAFLEET_METRICS_PORT", "metrics_port", "int", "Port of the Prometheus `/metrics` endpoint (0: off); one per worker on a host."),
    Variable("LORAFLEET_METRICS_MAX_ADAPTERS", "metrics_max_adapters", "int", "Busiest adapters named in the metrics' `adapter` label; the rest count as `other`."),
    Variable("LORAFLEET_JOB_TIMEOUT", "job_timeout", "float", "Seconds one job may run before arq cancels it."),
    Variable("LORAFLEET_MAX_JOBS", "max_jobs", "int", "Jobs taken from the queue at once (default 2 x max_num_seqs, at least max_num_seqs)."),
    Variable("LORAFLEET_POLL_DELAY", "poll_delay", "float", "Seconds between queue polls when idle."),
    Variable("LORAFLEET_KEEP_RESULT", "keep_result", "float", "Seconds arq keeps a job's result."),
    Variable("LORAFLEET_MAX_TRIES", "max_tries", "int", "Runs of one job before arq gives up (re-runs follow worker crashes)."),
    Variable("LORAFLEET_HEARTBEAT_TTL", "heartbeat_ttl", "float", "Seconds after which a dead worker's jobs run again elsewhere (its claims are refreshed every third of it)."),
    Variable("LORAFLEET_DRAIN_TIMEOUT", "drain_timeout", "float", "On SIGTERM, seconds running jobs get to finish before they go back to the queue."),
    Variable("LORAFLEET_STREAM_MAXLEN", "stream_maxlen", "int", "Entries kept per token stream (approximate cap)."),
    Variable("LORAFLEET_STREAM_TTL", "stream_ttl", "int", "Seconds a token stream lives after its last write."),
    Variable("LORAFLEET_WORKER_NAME", "name", "str", "Name in logs and in `lorafleet:workers` (default host:pid)."),
    Variable("LORAFLEET_LOG_FORMAT", "log_format", "str", "`text` (default) or `json`: one JSON object per line, with job_id, adapter and code fields on job lines."),
)  # fmt: skip


@dataclass(frozen=True)
class WorkerConfig:
    """A validated worker configuration (build it with ``from_env`` or ``create``)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 64
    max_num_seqs: int = 128
    max_model_len: int | None = None
    kv_cache_mb: int | None = None
    gpu_memory_utilization: float = 0.9
    engine_threads: int | None = None
    engine_stall_timeout: float = 120.0
    cuda_graphs: bool = False
    pipelined: bool = True
    adapter_roots: tuple[str, ...] = ()
    hub: str = "off"
    hub_cache: str | None = None
    max_adapter_mb: int = 2048
    adapter_failure_ttl: float = 30.0
    max_prompt_chars: int | None = None
    redis_url: str = DEFAULT_URL
    queue: str = DEFAULT_QUEUE
    metrics_port: int = 0
    metrics_max_adapters: int = 20
    job_timeout: float = 600.0
    max_jobs: int | None = None
    poll_delay: float = 0.01
    keep_result: float = 3600.0
    max_tries: int = 5
    heartbeat_ttl: float = 15.0
    drain_timeout: float = 25.0
    stream_maxlen: int = DEFAULT_MAXLEN
    stream_ttl: int = DEFAULT_TTL_S
    name: str = ""
    log_format: str = "text"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, flags: frozenset[str] = frozenset()
    ) -> WorkerConfig:
        """Read ``LORAFLEET_*`` variables (unset or empty = default). Raises ``ConfigError``.

        ``flags``: the fields whose value the user typed as a ``lorafleet`` flag (then in
        ``environ``); problems with them name the flag, not the variable."""
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
        has_model = "model" in values
        if not has_model:
            problems.append(
                "LORAFLEET_MODEL is not set (or --model): name the Hugging Face model folder "
                f"or catalog model ({', '.join(catalog_names())}) to serve"
            )
        config = cls(**{"model": "", **values})
        # Report every bad variable at once, not only the ones that failed to parse.
        problems += config._problems(check_model=has_model, labels=labels)
        if problems:
            raise ConfigError(_format(problems))
        return config

    @classmethod
    def create(cls, **values: Any) -> WorkerConfig:
        """Build and validate. Raises ``ConfigError`` listing every problem."""
        config = cls(**values)
        problems = config._problems()
        if problems:
            raise ConfigError(_format(problems))
        return config

    def _problems(
        self, *, check_model: bool = True, labels: Mapping[str, str] | None = None
    ) -> list[str]:
        """Every problem, each naming its setting by ``labels[field]`` (default: the
        variable)."""
        env = labels or {v.field: v.env for v in VARIABLES}
        problems = []

        def need(ok: bool, field: str, message: str) -> None:
            if not ok:
                problems.append(f"{env[field]} {message}, got {getattr(self, field)!r}")

        model = Path(self.model).expanduser()
        if check_model and (find_model(self.model) is None or model.is_dir()):
            need(
                model.is_dir(),
                "model",
                "must be an existing model folder or a catalog name "
                f"({', '.join(catalog_names())})",
            )
            if model.is_dir():
                need((model / "config.json").is_file(), "model", "has no config.json")
        need(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            "must be auto, cpu, cuda or cuda:N",
        )
        for field in ("max_loras", "max_lora_rank", "max_num_seqs", "max_tries", "stream_maxlen"):
            need(getattr(self, field) >= 1, field, "must be >= 1")
        for field in (
            "max_cpu_loras",
            "max_model_len",
            "kv_cache_mb",
            "max_jobs",
            "engine_threads",
        ):
            need(getattr(self, field) is None or getattr(self, field) >= 1, field, "must be >= 1")
        need(0 <= self.metrics_port < 65536, "metrics_port", "must be a port number (0: off)")
        need(self.metrics_max_adapters >= 0, "metrics_max_adapters", "must be >= 0")
        need(self.job_timeout > 0, "job_timeout", "must be > 0")
        need(self.engine_stall_timeout >= 0, "engine_stall_timeout", "must be >= 0 (0: never)")
        need(0 < self.poll_delay <= 5, "poll_delay", "must be in (0, 5] seconds")
        need(self.keep_result > 0, "keep_result", "must be > 0")
        need(self.stream_ttl >= 1, "stream_ttl", "must be >= 1")
        need(self.hub in HUB_MODES, "hub", f"must be one of {', '.join(HUB_MODES)}")
        need(self.adapter_failure_ttl >= 0, "adapter_failure_ttl", "must be >= 0")
        need(self.max_adapter_mb >= 1, "max_adapter_mb", "must be >= 1")
        need(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            "must be in (0, 1]",
        )
        need(
            self.max_prompt_chars is None or self.max_prompt_chars >= 1,
            "max_prompt_chars",
            "must be >= 1",
        )
        # Below a second, a beat every third of it is too easily missed under load.
        need(self.heartbeat_ttl >= 1, "heartbeat_ttl", "must be >= 1 second")
        need(self.drain_timeout >= 0, "drain_timeout", "must be >= 0")
        problems += _redis_url_problems(self.redis_url, env["redis_url"])
        need(bool(self.queue), "queue", "cannot be empty")
        need(self.log_format in LOG_FORMATS, "log_format", f"must be {' or '.join(LOG_FORMATS)}")
        for root in self.adapter_roots:
            if not Path(root).is_dir():
                problems.append(f"{env['adapter_roots']} names {root!r}, which is not a folder")
        if self.max_jobs is not None and self.max_jobs < self.max_num_seqs:
            problems.append(
                f"{env['max_jobs']} ({self.max_jobs}) must be >= {env['max_num_seqs']} "
                f"({self.max_num_seqs}), or the engine never sees a full batch"
            )
        if check_model and not problems:
            try:
                self.engine_config()
            except ValueError as e:
                problems.append(str(e))
        return problems

    @property
    def worker_name(self) -> str:
        return self.name or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def jobs_at_once(self) -> int:
        return self.max_jobs or 2 * self.max_num_seqs

    def engine_config(self) -> EngineConfig:
        """The engine's settings (``device`` ``auto`` is resolved by the engine process)."""
        extra: dict[str, Any] = {}
        if self.kv_cache_mb is not None:
            extra["kv_cache_bytes"] = self.kv_cache_mb * 2**20
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            num_threads=self.engine_threads or max(1, _usable_cores() - 1),
            adapter_roots=self.adapter_roots,
            max_adapter_bytes=self.max_adapter_mb * 2**20,
            adapter_failure_ttl=self.adapter_failure_ttl,
            hub=self.hub,
            hub_cache_dir=self.hub_cache,
            cuda_graphs=self.cuda_graphs,
            pipelined=self.pipelined,
            gpu_memory_utilization=self.gpu_memory_utilization,
            **extra,
        )

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
        defaults = {f.name: f.default for f in fields(self)}
        for var in VARIABLES:
            value = getattr(self, var.field)
            if value != defaults.get(var.field):
                env[var.env] = os.pathsep.join(value) if var.kind == "paths" else str(value)
        return env


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


def build_worker_settings(config: WorkerConfig) -> type:
    """arq worker settings (a class, as arq expects) for ``config``."""
    name = config.worker_name
    if not config.name:
        config = replace(config, name=name)
    return type(
        "WorkerSettings",
        (),
        {
            "__doc__": f"arq settings of lorafleet worker {name}.",
            "functions": [func(jobs.generate, name=GENERATE_FUNCTION, timeout=config.job_timeout)],
            "queue_name": config.queue,
            "redis_settings": config.redis_settings(),
            "job_serializer": arq_serialize,
            "job_deserializer": arq_deserialize,
            "on_startup": jobs.startup,
            "on_shutdown": jobs.shutdown,
            "ctx": {"config": config},
            "max_jobs": config.jobs_at_once,
            "poll_delay": config.poll_delay,
            "job_timeout": config.job_timeout,
            "keep_result": config.keep_result,
            "max_tries": config.max_tries,
            "health_check_interval": 10,
            # arq logs job arguments and results by repr: binary payloads, not useful.
            "log_results": False,
        },
    )


def __getattr__(name: str) -> Any:
    # Built on lookup, so `arq lorafleet.worker.WorkerSettings` reads the environment of
    # the process that runs it, and a bad variable fails right there with ConfigError.
    if name == "WorkerSettings":
        return build_worker_settings(WorkerConfig.from_env())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
