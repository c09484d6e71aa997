"""What crosses the socket between a worker and its engine process, and how it is framed.

The worker (parent) and the engine process (child) are the same program version on the same
host, so messages are pickled dataclasses; each frame is a 4-byte big-endian length and a
pickle. The parent sends a list of commands per event-loop tick; the child sends one
``EngineUpdate`` per step that did something.

The first frame from the parent is the ``EngineConfig``; the child answers with
``EngineReady`` or ``EngineFailed``.
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass

from lorafleet.producer.types import ChatMessage, LoRARequest, SamplingParams
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.outputs import EngineSnapshot, StepOutput, StepStats

_HEADER = struct.Struct("!I")


# -- parent -> child ---------------------------------------------------------------------


@dataclass
class AddRequest:
    """A request; with ``messages`` a chat request, whose prompt the engine renders with
    the model's chat template (``prompt`` is then unused). ``resume_token_ids``: output
    tokens an earlier run made, to continue after (see ``LLMEngine.add_request``)."""

    request_id: str
    prompt: str | None
    sampling_params: SamplingParams
    lora_request: LoRARequest | None
    arrival_time: float | None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    resume_token_ids: list[int] | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class PrefetchAdapters:
    """Read these adapters into the CPU cache in the background (jobs for them are waiting
    in the queue for this worker); see ``lorafleet.worker.adapters.prefetch``."""

    loras: list[LoRARequest]


@dataclass
class Shutdown:
    """Stop stepping and exit; requests still in the engine are dropped."""


Command = AddRequest | AbortRequest | PrefetchAdapters | Shutdown


# -- child -> parent ---------------------------------------------------------------------


@dataclass(frozen=True)
class EngineInfo:
    """Facts fixed at load: the config as resolved (device ``auto`` made concrete), the
    dtype the model loaded in (the config may say ``auto``), the served model's name, and
    the KV cache: tokens it holds, bytes, and how its size was decided."""

    config: EngineConfig
    max_model_len: int
    dtype: str
    model_name: str = ""
    kv_cache_tokens: int = 0
    kv_cache_bytes: int = 0
    kv_cache_source: str = ""

    def describe(self) -> str:
        """One line for logs: model, device, dtype, context, KV cache, adapter slots."""
        c = self.config
        return (
            f"model {self.model_name} on {c.device} ({self.dtype}), max_model_len "
            f"{self.max_model_len}, KV cache {self.kv_cache_tokens} tokens "
            f"({self.kv_cache_bytes / 2**20:.0f} MiB), {c.max_loras} adapter slots of rank "
            f"<= {c.max_lora_rank}, {c.max_cpu_loras} in host memory"
        )


@dataclass(frozen=True)
class EngineReady:
    info: EngineInfo


@dataclass(frozen=True)
class EngineFailed:
    """Loading the model failed; ``message`` says why (the child exits after sending it)."""

    message: str


@dataclass(frozen=True)
class EngineUpdate:
    """One step's outputs; ``stats`` is None when no step ran (only commands were handled)."""

    outputs: list[StepOutput]
    stats: StepStats | None
    snapshot: EngineSnapshot


# -- framing -----------------------------------------------------------------------------


def pack(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def read_header(header: bytes) -> int:
    return _HEADER.unpack(header)[0]


HEADER_SIZE = _HEADER.size


class FrameReader:
    """Reads frames from a blocking socket, with or without waiting (the child's side).

    ``read(wait=False)`` returns the frames that have fully arrived, possibly none;
    ``read(wait=True)`` blocks until at least one has. Returns None once the peer closed
    the socket (the parent exited).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self, wait: bool) -> list[object] | None:
        while True:
            try:
                chunk = self._sock.recv(1 << 20, 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return self._frames()
            if not chunk:
                return None
            self._buffer += chunk
            frames = self._frames()
            if frames:
                return frames
            # Waiting and the frame is not complete yet: read on.

    def _frames(self) -> list[object]:
        frames, offset, buffer = [], 0, self._buffer
        while len(buffer) - offset >= HEADER_SIZE:
            size = _HEADER.unpack_from(buffer, offset)[0]
            end = offset + HEADER_SIZE + size
            if len(buffer) < end:
                break
            frames.append(pickle.loads(buffer[offset + HEADER_SIZE : end]))
            offset = end
        del buffer[:offset]
        return frames
