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
has the answer the moment it sees the event, without another round trip.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lorafleet.producer.codec import WIRE_VERSION, JobResult
from lorafleet.producer.errors import InvalidRequestError, UnsupportedVersionError
from lorafleet.producer.keys import stream_key

#: Field of a stream entry that holds the encoded event.
FIELD = b"e"

#: Default cap on entries per stream; entries are per engine step, so this is many tokens.
DEFAULT_MAXLEN = 4096

#: Default seconds a stream lives after its last write.
DEFAULT_TTL_S = 600


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a job stream: new text of one attempt, or that attempt's end.

    ``text`` / ``token_ids`` are deltas since the previous event of the same attempt.
    ``result`` is set on the final event only.
    """

    attempt: int
    seq: int
    text: str = ""
    token_ids: list[int] = msgspec.field(default_factory=list)
    result: JobResult | None = None
    v: int = WIRE_VERSION

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
    if event.v != WIRE_VERSION:
        raise UnsupportedVersionError(f"stream event version {event.v} is not supported")
    return event


def add_event(pipe: Any, job_id: str, event: StreamEvent, *, maxlen: int, ttl_s: int) -> None:
    """Queue the XADD (capped) and EXPIRE of one event on a redis-py pipeline."""
    key = stream_key(job_id)
    pipe.xadd(key, {FIELD: encode_event(event)}, maxlen=maxlen, approximate=True)
    pipe.expire(key, ttl_s)
