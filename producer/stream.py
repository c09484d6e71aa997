"""Per-job token stream protocol.

A worker appends ``StreamEvent`` entries to the Redis stream ``lorafleet:stream:{job_id}``
while it generates; readers block on XREAD. Each entry has one field, ``e``, holding a
msgpack-encoded event. The stream is capped (``XADD MAXLEN ~``) and expires a while after
its last write, so an abandoned job never leaks memory; arq's result key stays the durable
record of the outcome.

Events carry the attempt number (arq's ``job_try``) and a per-attempt sequence number:

- a job re-run after a worker crash starts a new attempt at ``seq`` 0, and readers drop
  events of older attempts, so two runs never interleave in a reader's text;
- a jump in ``seq`` tells a reader that trimming dropped entries it had not read yet; a
  repeated ``seq`` (a retried XADD) is skipped.

The last event of an attempt carries the whole ``JobResult`` (output or error), so a reader
has the answer the moment it sees the event, without another round trip. The worker also
appends that event, with the job id, to the submitting client's inbox stream
(``GenerateJob.reply_to``): a client waiting on a thousand jobs blocks on its inbox alone,
and reads job streams only for the jobs whose tokens it is following.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lorafleet.producer.codec import READABLE_VERSIONS, WIRE_VERSION, JobResult
from lorafleet.producer.errors import InvalidRequestError, UnsupportedVersionError
from lorafleet.producer.keys import INBOX_PREFIX, stream_key

#: Field of a stream entry that holds the encoded event.
FIELD = b"e"

#: Field of an inbox entry that names the job whose final event it carries.
JOB_FIELD = b"j"

#: Approximate cap on entries of a client inbox; a reply trimmed before the client read it
#: is still found through arq's result key.
INBOX_MAXLEN = 10_000

#: Default cap on entries per stream; entries are per engine step, so this is many tokens.
DEFAULT_MAXLEN = 4096

#: Default seconds a stream lives after its last write.
DEFAULT_TTL_S = 600


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a job stream: new text of one attempt, or that attempt's end.

    ``text`` / ``token_ids`` are deltas since the previous event of the same attempt.
    ``result`` is set on the final event only. ``worker`` names the worker running the
    attempt, on its first event (``seq`` 0): the ledger charges a run cut short to it.
    """

    attempt: int
    seq: int
    text: str = ""
    token_ids: list[int] = msgspec.field(default_factory=list)
    result: JobResult | None = None
    v: int = WIRE_VERSION
    worker: str | None = None

    @property
    def final(self) -> bool:
        return self.result is not None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StreamEvent)


def encode_event(event: StreamEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> StreamEvent:
    """Decode one entry's ``e`` field. Raises ``InvalidRequestError`` /
    ``UnsupportedVersionError`` for a malformed or newer event."""
    try:
        event = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidRequestError(f"malformed stream event: {e}") from None
    if event.v not in READABLE_VERSIONS:
        raise UnsupportedVersionError(f"stream event version {event.v} is not supported")
    return event


def add_event(pipe: Any, job_id: str, event: StreamEvent, *, maxlen: int, ttl_s: int) -> None:
    """Queue the XADD (capped) and EXPIRE of one event on a redis-py pipeline."""
    key = stream_key(job_id)
    pipe.xadd(key, {FIELD: encode_event(event)}, maxlen=maxlen, approximate=True)
    pipe.expire(key, ttl_s)


def add_reply(pipe: Any, reply_to: str, job_id: str, event: StreamEvent, *, ttl_s: int) -> None:
    """Queue the copy of a final event for the submitting client's inbox. Keys outside
    ``lorafleet:inbox:`` are ignored: a job must not make a worker write anywhere else."""
    if not reply_to.startswith(INBOX_PREFIX):
        return
    fields = {JOB_FIELD: job_id.encode(), FIELD: encode_event(event)}
    pipe.xadd(reply_to, fields, maxlen=INBOX_MAXLEN, approximate=True)
    pipe.expire(reply_to, ttl_s)
