"""arq's settings for a worker: ``arq lorafleet.worker.WorkerSettings`` and the
``lorafleet worker`` command run the class ``build_worker_settings`` makes.

``WorkerSettings`` is built when it is looked up, so plain ``arq`` reads the environment of
the process that runs it, and a bad variable fails right there with ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from arq.worker import func

from lorafleet.producer.codec import arq_deserialize, arq_serialize
from lorafleet.producer.keys import GENERATE_FUNCTION
from lorafleet.worker.serve import jobs
from lorafleet.worker.serve.settings import WorkerConfig


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
