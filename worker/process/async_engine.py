"""Asyncio front of the engine: the engine steps in its own process, callers await streams.

The step loop must not run in the worker's process: a forward pass is milliseconds to
seconds of mostly-Python work that, sharing one GIL with the event loop, stalls Redis
polling and token publishing and halves the jobs a worker can take per second. So the
engine runs in ``lorafleet.worker.process.engine_process``, connected by a socket pair; this side
only pickles commands and unpickles step outputs, all on the event loop (no threads).

Commands (add, abort) are batched per event-loop tick into one frame. The engine answers
each step with the outputs and a snapshot of its counters (``snapshot``), which metrics and
heartbeats read instead of reaching into the engine.

If the engine process dies, every open stream fails with ``InternalError``; ``on_exit``, if
given, is called first with the exit status (the worker exits there, so arq re-runs its
jobs elsewhere rather than failing them). A hung engine (a wedged device, a deadlock) is
made a dead one: with requests in flight, the engine answers every step, so when no answer
comes for ``stall_timeout_s`` the engine process is killed and the same path runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lorafleet.producer.errors import InternalError
from lorafleet.producer.types import ChatMessage, LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.outputs import EngineSnapshot, StepOutput, StepStats
from lorafleet.worker.process.link import (
    HEADER_SIZE,
    AbortRequest,
    AddRequest,
    Command,
    EngineFailed,
    EngineInfo,
    EngineReady,
    EngineUpdate,
    PrefetchAdapters,
    Shutdown,
    pack,
    read_header,
)

log = logging.getLogger(__name__)

#: Seconds ``stop()`` waits for the engine process to exit before killing it.
STOP_TIMEOUT_S = 10.0


class EngineStartError(RuntimeError):
    """The engine process could not load the model (the message says why)."""


@dataclass(frozen=True)
class RequestDelta:
    """New text and tokens of one completion (``index`` of the request's ``n``) since its
    previous delta; ``finished`` when the whole request is."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    index: int = 0


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
            yield RequestDelta(
                out.delta_text, out.delta_token_ids, out.finished, out.finish_reason, out.index
            )
            if out.finished:
                return

    async def result(self) -> RequestOutput:
        """The final output; raises the request's ``LoraFleetError`` if it failed."""
        return await asyncio.shield(self._final)

    @property
    def done(self) -> bool:
        return self._final.done()


class AsyncEngine:
    """``await start()`` launches the engine process and waits until the model is loaded
    (raising ``EngineStartError`` if it cannot be); ``await stop()`` ends it.

    ``step_observer``, if set, is called on the event loop with each step's ``StepStats``
    (metrics); it must be quick and must not raise. ``info`` (after ``start``) holds the
    facts fixed at load; ``snapshot`` the engine's counters as of its latest step.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_exit: Callable[[int | None], None] | None = None,
        stall_timeout_s: float | None = None,
    ) -> None:
        """``stall_timeout_s``: seconds without a step answer, while requests are in flight,
        after which the engine counts as hung and is killed (None or 0: never). It must
        exceed the slowest legitimate step: a long prefill, a kernel compile, an adapter
        read from a slow disk."""
        self.config = config
        self.on_exit = on_exit
        self.stall_timeout_s = stall_timeout_s or None
        self.stalled = False  # the watchdog killed the engine
        self.step_observer: Callable[[StepStats], None] | None = None
        self.info: EngineInfo | None = None
        self.snapshot = EngineSnapshot()
        self._streams: dict[str, RequestStream] = {}
        self._pending: list[Command] = []
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._receiving: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_answer = 0.0  # loop time of the last update, or of going busy
        self._running = False  # ready and neither stopped nor dead
        self._stopping = False

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # never import a folder of the current directory as a package
                "-m",
                "lorafleet.worker.process.engine_process",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        self._reader, self._writer = await asyncio.open_connection(sock=ours)
        self._writer.write(pack(self.config))
        try:
            first = await self._receive()
        except asyncio.IncompleteReadError:
            code = await self._process.wait()
            raise EngineStartError(
                f"the engine process exited with status {code} while loading"
            ) from None
        if isinstance(first, EngineFailed):
            await self._process.wait()
            raise EngineStartError(first.message)
        assert isinstance(first, EngineReady), first
        self.info = first.info
        self._running = True
        self._receiving = asyncio.create_task(self._receive_forever(), name="lorafleet-engine")
        if self.stall_timeout_s is not None:
            self._watchdog = asyncio.create_task(self._watch(), name="lorafleet-engine-watchdog")

    async def stop(self) -> None:
        """Stop the engine process; streams still open fail with ``InternalError``."""
        self._stopping = True
        self._running = False
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._process is None:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._send(Shutdown())
            self._flush()
        try:
            await asyncio.wait_for(self._process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the engine process did not stop in %.0fs; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            await self._process.wait()
        if self._receiving is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiving
        if self._writer is not None:
            self._writer.close()
        self._fail_all("the engine was stopped")

    @property
    def pid(self) -> int | None:
        """The engine process's id (None before ``start``)."""
        return self._process.pid if self._process is not None else None

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        sampling_params: SamplingParams,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
        *,
        messages: list[ChatMessage] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        resume_token_ids: list[int] | None = None,
    ) -> RequestStream:
        """Queue a request; with ``messages``, a chat request whose prompt the engine
        renders with the model's chat template (``prompt`` unused); ``resume_token_ids``
        continue an earlier run (see ``LLMEngine.add_request``). Anything wrong with it
        (prompt too long, adapter errors, a conversation the template refuses) arrives as
        the stream's error; only a request id already in flight raises here."""
        if request_id in self._streams:
            raise InternalError(f"request id {request_id!r} is already in flight")
        if not self._running:
            raise InternalError("the engine is not running")
        stream = RequestStream(request_id)
        if not self._streams:  # idle until now: the stall clock starts here
            self._last_answer = asyncio.get_running_loop().time()
        self._streams[request_id] = stream
        self._send(
            AddRequest(
                request_id,
                prompt,
                sampling_params,
                lora_request,
                arrival_time,
                messages,
                add_generation_prompt,
                continue_final_message,
                resume_token_ids,
            )
        )
        return stream

    def prefetch(self, loras: list[LoRARequest]) -> None:
        """Ask the engine to read these adapters into its CPU cache in the background (jobs
        for them are waiting); a no-op when the engine is not running."""
        if self._running and loras:
            self._send(PrefetchAdapters(list(loras)))

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream finishes with ``finish_reason == "abort"``."""
        if request_id in self._streams:
            self._send(AbortRequest(request_id))

    # -- the socket ------------------------------------------------------------------------

    def _send(self, command: Command) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(command)

    def _flush(self) -> None:
        if self._pending and self._writer is not None and not self._writer.is_closing():
            self._writer.write(pack(self._pending))
        self._pending = []

    async def _receive(self) -> object:
        header = await self._reader.readexactly(HEADER_SIZE)
        return pickle.loads(await self._reader.readexactly(read_header(header)))

    async def _receive_forever(self) -> None:
        try:
            while True:
                update = await self._receive()
                self._deliver(update)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the engine process exited
        except Exception:  # a message we cannot read: the link is unusable, end the engine
            log.exception("reading from the engine process failed")
            self._process.kill()
        self._running = False
        code = await self._process.wait()
        if self._stopping:
            return
        reason = (
            f"the engine process hung (no step in {self.stall_timeout_s:g}s) and was killed"
            if self.stalled
            else f"the engine process exited with status {code}"
        )
        log.critical("%s", reason)
        if self.on_exit is not None:
            self.on_exit(code)
        self._fail_all(reason)

    def _deliver(self, update: EngineUpdate) -> None:
        self._last_answer = asyncio.get_running_loop().time()
        self.snapshot = update.snapshot
        for out in update.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._push(out)
            if out.finished:
                del self._streams[out.request_id]
        if update.stats is not None and self.step_observer is not None:
            self.step_observer(update.stats)

    async def _watch(self) -> None:
        """Kill the engine process when it has not answered a step in ``stall_timeout_s``
        while requests wait on it; ``_receive_forever`` then sees it exit."""
        loop = asyncio.get_running_loop()
        timeout = self.stall_timeout_s
        tick = min(1.0, timeout / 4)
        last_tick = loop.time()
        while self._running:
            await asyncio.sleep(tick)
            now = loop.time()
            # A late tick means this process was frozen or starved (SIGSTOP of the process
            # group, a paused VM, a blocked loop): that time is not the engine's silence.
            late = now - last_tick - tick
            if late > 1.0:
                self._last_answer += late
            last_tick = now
            silent = now - self._last_answer
            if self._running and self._streams and silent > timeout:
                log.critical(
                    "the engine process answered no step in %.1fs with %d requests in flight;"
                    " killing it as hung",
                    silent,
                    len(self._streams),
                )
                self.stalled = True
                self._process.kill()
                return

    def _fail_all(self, reason: str) -> None:
        for request_id, stream in list(self._streams.items()):
            stream._push(StepOutput(request_id, "", [], True, "error", error=InternalError(reason)))
        self._streams.clear()
