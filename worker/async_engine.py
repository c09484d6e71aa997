"""Asyncio front of the engine: the engine steps on its own thread, callers await streams.

The step loop must not run on the event loop: a forward pass blocks for milliseconds to
seconds, and the worker's event loop keeps polling Redis and publishing tokens meanwhile.
Commands (add, abort) cross into the engine thread through a queue; outputs come back with
``loop.call_soon_threadsafe``, once per step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lorafleet.producer.errors import InternalError, LoraFleetError
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine import LLMEngine, StepOutput, StepStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestDelta:
    """New text and tokens of one request since its previous delta."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


class RequestStream:
    """Deltas of one request as they are produced, then its final output (or error)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._final: asyncio.Future[RequestOutput] = asyncio.get_running_loop().create_future()
        self._final.add_done_callback(lambda f: f.exception())  # no "never retrieved" noise

    def _push(self, out: StepOutput) -> None:
        self._queue.put_nowait(out)
        if out.finished and not self._final.done():
            if out.error is not None:
                self._final.set_exception(out.error)
            else:
                self._final.set_result(out.output)

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        while True:
            out = await self._queue.get()
            if out.error is not None:
                raise out.error
            yield RequestDelta(out.delta_text, out.delta_token_ids, out.finished, out.finish_reason)
            if out.finished:
                return

    async def result(self) -> RequestOutput:
        """The final output; raises the request's ``LoraFleetError`` if it failed."""
        return await asyncio.shield(self._final)

    @property
    def done(self) -> bool:
        return self._final.done()


class AsyncEngine:
    """``AsyncEngine(config)`` loads the model (blocking); ``await start()`` begins stepping.

    ``step_observer``, if set, is called on the engine thread with each successful step's
    ``StepStats`` (metrics); it must be quick and must not raise.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.step_observer: Callable[[StepStats], None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lorafleet-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def add_request(
        self,
        request_id: str,
        prompt: str,
        sampling_params: SamplingParams,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request. Checks that need no disk (prompt length, LoRA enabled, id
        conflicts) raise here; adapter file errors arrive through the stream."""
        if request_id in self._streams:
            raise InternalError(f"request id {request_id!r} is already in flight")
        ids = self.engine.encode(prompt)
        self.engine.check_prompt(ids)
        if lora_request is not None:
            self.engine.adapters.check(lora_request)
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._commands.put(
            ("add", request_id, prompt, sampling_params, lora_request, arrival_time, ids)
        )
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream finishes with ``finish_reason == "abort"``."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            outputs = self._drain_commands()
            if self.engine.has_unfinished():
                try:
                    outputs.extend(self.engine.step())
                except Exception as e:  # a bug or device error: fail in-flight requests, live on
                    log.exception("engine step failed")
                    outputs.extend(self._fail_all(InternalError(f"engine step failed: {e!r}")))
                else:
                    if self.step_observer is not None:
                        self.step_observer(self.engine.last_step)
            elif not outputs:
                self._wake.wait(0.05)
                self._wake.clear()
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _drain_commands(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return outputs
            if cmd[0] == "add":
                _, rid, prompt, params, lora, arrival, ids = cmd
                try:
                    self.engine.add_request(
                        rid, prompt, params, lora, arrival, prompt_token_ids=ids
                    )
                except LoraFleetError as err:
                    outputs.append(StepOutput(rid, "", [], True, "error", error=err))
                except Exception as e:  # escaping here would end the engine thread for good
                    log.exception("adding request %s failed", rid)
                    err = InternalError(f"adding the request failed: {e!r}")
                    outputs.append(StepOutput(rid, "", [], True, "error", error=err))
            else:
                out = self.engine.abort(cmd[1])
                if out is not None:
                    outputs.append(out)

    def _fail_all(self, err: LoraFleetError) -> list[StepOutput]:
        outputs = []
        for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            self.engine.scheduler.finish(seq)
            outputs.append(StepOutput(seq.request_id, "", [], True, "error", error=err))
        return outputs

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._push(out)
            if out.finished:
                del self._streams[out.request_id]
