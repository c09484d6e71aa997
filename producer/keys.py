"""Redis key names shared by producers and workers.

Everything lorafleet adds next to arq's own keys lives under ``lorafleet:`` so it can be
found, monitored and deleted as a group. arq's keys (``arq:job:*``, ``arq:result:*``) keep
arq's names because arq's worker hard-codes them.
"""

from __future__ import annotations

from arq.constants import job_key_prefix, result_key_prefix

NAMESPACE = "lorafleet"

#: Default arq queue (sorted set) that producers fill and workers drain.
DEFAULT_QUEUE = f"{NAMESPACE}:queue"

#: Name under which the worker registers the job coroutine with arq.
GENERATE_FUNCTION = "generate"

#: Pub/sub channel on which producers announce aborts (the message is the job id).
ABORT_CHANNEL = f"{NAMESPACE}:abort"

#: Hash of live workers: worker name -> JSON description, written once a worker is ready.
WORKERS_KEY = f"{NAMESPACE}:workers"


def stream_key(job_id: str) -> str:
    """Stream of a job's token events (see ``lorafleet.producer.stream``)."""
    return f"{NAMESPACE}:stream:{job_id}"


def abort_key(job_id: str) -> str:
    """Set when a producer aborts a job; read by a worker before it starts the job."""
    return f"{NAMESPACE}:abort:{job_id}"


#: Prefix of client inboxes; a worker writes replies only to keys under it.
INBOX_PREFIX = f"{NAMESPACE}:inbox:"


def inbox_key(client_id: str) -> str:
    """A client's private stream: the final events of the jobs it submitted, and the
    entries it writes itself to interrupt its own blocking XREAD."""
    return INBOX_PREFIX + client_id


def arq_job_key(job_id: str) -> str:
    return job_key_prefix + job_id


def arq_result_key(job_id: str) -> str:
    return result_key_prefix + job_id
