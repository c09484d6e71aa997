"""Where a re-run of a job picks up: the output tokens its previous run streamed.

Every run of a job streams its tokens to ``lorafleet:stream:{job_id}``, tagged with its
attempt and a per-attempt sequence number. When a worker drains past its grace period or
dies, arq runs the job again; that run reads what the last run streamed and continues
after it (``LLMEngine.add_request(resume_token_ids=...)``) instead of starting over, so a
rolling restart or a crash never doubles the work of long generations. The last streamed
token is made again, so the continuation meets every stop condition of the token it ends
on. The first event of a continuing run carries the tokens it continues from, so a run cut
short again can itself be continued.
"""

from __future__ import annotations

from typing import Any

from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.keys import stream_key
from lorafleet.producer.stream import FIELD, StreamEvent, decode_event


async def earlier_tokens(redis: Any, job_id: str, attempt: int) -> list[int]:
    """The output tokens the latest run before ``attempt`` streamed, when that run did not
    end and every one of its events is still in the stream (none trimmed); else []."""
    runs: dict[int, dict[int, StreamEvent]] = {}
    for _, fields in await redis.xrange(stream_key(job_id)):
        try:
            event = decode_event(fields[FIELD])
        except (LoraFleetError, KeyError):
            continue  # not an event this build reads: nothing to continue from
        if event.attempt < attempt:
            runs.setdefault(event.attempt, {}).setdefault(event.seq, event)  # retried XADDs
    if not runs:
        return []
    events = runs[max(runs)]
    if any(e.final for e in events.values()) or sorted(events) != list(range(len(events))):
        return []
    return [t for seq in sorted(events) for t in events[seq].token_ids]


def resume_point(tokens: list[int]) -> list[int]:
    """The tokens a continuation starts after: all but the last one streamed."""
    return tokens[:-1]
