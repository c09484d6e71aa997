"""asyncio producer client: enqueue generation jobs, wait for results, stream tokens.

Jobs go through arq: each is an arq job whose single argument is the encoded
``GenerateJob`` (msgspec msgpack, arq envelope msgpack too). Tokens come back on the job's
Redis stream and the final event also in the client's inbox stream (see
``lorafleet.producer.stream``), read by one shared blocking XREAD per client
(``lorafleet.producer.watch``), so waiting never polls.

Example::

    async with Client("redis://localhost:6379/0") as client:
        outs = await client.generate(["a", "b"], SamplingParams(max_tokens=8), lora_request=sql)
        async for text in client.stream("Convert to SQL: ...", lora_request=sql):
            print(text, end="")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from redis.exceptions import WatchError

from lorafleet.producer.codec import GenerateJob, JobResult, arq_deserialize, arq_serialize, encode
from lorafleet.producer.errors import (
    InternalError,
    QueueUnavailableError,
    StreamRestartedError,
    error_from_info,
)
from lorafleet.producer.keys import (
    ABORT_CHANNEL,
    DEFAULT_QUEUE,
    GENERATE_FUNCTION,
    abort_key,
)
from lorafleet.producer.types import (
    ChatMessage,
    LoRARequest,
    RequestOutput,
    SamplingParams,
    chat_messages,
    conversations,
    per_prompt,
)
from lorafleet.producer.watch import REDIS_ERRORS, JobWatch, StreamWatcher

#: Environment variable naming the Redis URL when none is passed.
URL_ENV = "LORAFLEET_REDIS_URL"
DEFAULT_URL = "redis://localhost:6379/0"

#: How long an abort request is remembered for a job that has not started yet.
ABORT_TTL_S = 86_400


def resolve_url(url: str | None) -> str:
    """``url``, else ``$LORAFLEET_REDIS_URL``, else ``redis://localhost:6379/0``."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _result_output(result: JobResult) -> RequestOutput:
    if result.error is not None:
        raise error_from_info(result.error)
    if result.output is None:
        raise InternalError(f"job {result.request_id} returned neither output nor error")
    return result.output


class JobHandle:
    """A submitted job: wait for its ``result()``, follow its ``stream()``, or ``abort()`` it."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        watch: JobWatch,
        watcher: StreamWatcher,
        n: int | None = None,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self._watch = watch
        self._watcher = watcher
        self._n = n  # completions, when this client submitted the job

    @property
    def done(self) -> bool:
        """Whether the outcome is known to this client (no Redis call)."""
        return self._watch.done

    async def result(self, timeout: float | None = None) -> RequestOutput:
        """The job's output. Raises its typed ``LoraFleetError`` if it failed, and
        ``TimeoutError`` after ``timeout`` seconds (the job keeps running)."""
        result = await asyncio.wait_for(self._watch.wait_done(), timeout)
        return _result_output(result)

    async def stream(self) -> AsyncIterator[str]:
        """Text deltas as the worker produces them; they concatenate to ``result()``'s text.

        Ends when the job ends; raises the job's typed error if it failed (after yielding
        whatever text it produced). A re-run of the job (worker crash) restarts at its new
        attempt: text already yielded is not repeated, and ``StreamRestartedError`` is raised
        if the re-run's output differs from it. A job with ``n > 1`` has no one text to
        stream (``ValueError``): ``result()`` holds its completions.
        """
        if self._n is not None and self._n > 1:
            raise ValueError(f"job {self.job_id} has n={self._n} completions: use result()")
        async with self._watcher.follow(self._watch):
            async for delta in self._deltas():
                yield delta

    async def _deltas(self) -> AsyncIterator[str]:
        watch = self._watch
        emitted = ""  # text handed to the caller
        text, attempt, next_seq, contiguous = "", 0, 0, True  # the attempt being read
        seen = 0
        while True:
            while seen < len(watch.events):
                event = watch.events[seen]
                seen += 1
                if event.attempt != attempt:
                    text, attempt, next_seq, contiguous = "", event.attempt, 0, True
                if event.seq < next_seq:  # the same entry twice (a retried XADD)
                    continue
                # Entries trimmed before we read them: the rest comes from the final text.
                contiguous = contiguous and event.seq == next_seq
                next_seq = event.seq + 1
                if contiguous:
                    text += event.text
                    if len(text) > len(emitted) and text.startswith(emitted):
                        delta, emitted = text[len(emitted) :], text
                        yield delta
            if watch.done:
                break
            await watch.wait_beyond(seen)
        final = _result_output(await watch.wait_done()).outputs[0].text
        if not final.startswith(emitted):
            raise StreamRestartedError(
                f"job {self.job_id} was re-run and its new output differs from the text "
                "already streamed; result() holds the final output"
            )
        if len(final) > len(emitted):
            yield final[len(emitted) :]

    async def abort(self) -> None:
        """Ask the worker to stop the job; ``result()`` then raises ``AbortedError`` (unless
        the job finished first)."""
        await self._client.abort(self.job_id)

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id} done={self.done}>"


class Client:
    """asyncio client over a Redis URL (``redis://``, ``rediss://`` or ``unix://``).

    Connects on first use (or ``await client.connect()``); raises ``QueueUnavailableError``
    when Redis does not answer within ``connect_timeout`` seconds. ``max_connections``
    bounds the pool used for enqueueing; waiting on results uses one more connection.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queue_name: str = DEFAULT_QUEUE,
        connect_timeout: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        self.url = resolve_url(url)
        self.queue_name = queue_name
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.client_id = uuid.uuid4().hex
        self._arq: ArqRedis | None = None
        self._reader: aioredis.Redis | None = None
        self._watcher: StreamWatcher | None = None
        self._connecting = asyncio.Lock()

    # -- connection ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transport(self) -> Iterator[None]:
        """Turn Redis connection failures into ``QueueUnavailableError``.

        ``WatchError`` is one of them here: arq's enqueue handles the WatchError of a lost
        race itself, so one that escapes is redis-py refusing to retry a command on a
        connection whose WATCH was lost (Redis restarting). Resubmitting with the same
        ``job_id`` is safe: it is an idempotency key.
        """
        try:
            yield
        except (*REDIS_ERRORS, WatchError) as e:
            raise QueueUnavailableError(
                f"Redis at {redact_url(self.url)} is unavailable: {e or type(e).__name__}"
            ) from e

    async def connect(self) -> Self:
        async with self._connecting:
            if self._arq is None:
                await self._open()
        return self

    async def _open(self) -> None:
        # The pool blocks (rather than fails) when all its connections are busy, so a burst
        # of submits queues up instead of opening one socket per job.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=None,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=max(self.connect_timeout, 10.0),
        )
        arq = ArqRedis(
            pool,
            job_serializer=arq_serialize,
            job_deserializer=arq_deserialize,
            default_queue_name=self.queue_name,
        )
        try:
            with self._transport():
                async with asyncio.timeout(self.connect_timeout):
                    await arq.ping()
        except QueueUnavailableError as e:
            await arq.aclose(close_connection_pool=True)
            if isinstance(e.__cause__, TimeoutError):
                raise QueueUnavailableError(
                    f"Redis at {redact_url(self.url)} did not answer within "
                    f"{self.connect_timeout:g}s"
                ) from e.__cause__
            raise
        block_ms = 1000
        # Blocking reads need their own connection and a socket timeout beyond the block.
        self._reader = aioredis.Redis.from_url(
            self.url,
            single_connection_client=True,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=block_ms / 1000 + self.connect_timeout,
        )
        self._watcher = StreamWatcher(
            self._reader,
            arq,
            self.client_id,
            block_ms=block_ms,
            reconnect_s=self.connect_timeout,
        )
        self._arq = arq

    async def close(self) -> None:
        """Stop waiting on jobs (their handles fail) and close connections. Jobs keep
        running on the workers."""
        if self._watcher is not None:
            await self._watcher.close()
        if self._reader is not None:
            await self._reader.aclose()
        if self._arq is not None:
            await self._arq.aclose(close_connection_pool=True)
        self._arq = self._reader = self._watcher = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connected(self) -> tuple[ArqRedis, StreamWatcher]:
        if self._arq is None:
            await self.connect()
        assert self._arq is not None and self._watcher is not None
        return self._arq, self._watcher

    # -- jobs ------------------------------------------------------------------------

    async def submit(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        *,
        messages: Sequence[dict | ChatMessage] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        job_id: str | None = None,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> JobHandle:
        """Enqueue one generation job and return its handle.

        Pass a ``prompt``, or ``messages`` (one conversation of ``{"role", "content"}``
        dicts) for a chat job: the worker renders them with the model's chat template
        (``add_generation_prompt`` and ``continue_final_message`` as in vLLM's
        ``LLM.chat``). ``job_id`` is an idempotency key: submitting an id that is queued,
        running or finished (result still kept) returns a handle to that job instead of a
        new one. ``deadline`` (Unix time) or ``timeout`` (seconds from now): past it the job
        fails with ``DeadlineExceededError``, without GPU work if it has not started.
        """
        job = _make_job(
            prompt,
            messages,
            sampling_params,
            lora_request,
            job_id,
            deadline,
            timeout,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        arq, watcher = await self._connected()
        job = msgspec.structs.replace(job, reply_to=watcher.inbox)
        with self._transport():
            enqueued = await arq.enqueue_job(
                GENERATE_FUNCTION,
                encode(job),
                _job_id=job.request_id,
                _queue_name=self.queue_name,
            )
            # A job that already existed replies elsewhere and may have finished long ago.
            fresh = enqueued is not None
            watch = await watcher.watch(job.request_id, via_inbox=fresh, sweep_now=not fresh)
        return JobHandle(self, job.request_id, watch, watcher, n=job.sampling_params.n)

    async def job(self, job_id: str) -> JobHandle:
        """A handle to a job submitted earlier (by any client)."""
        _, watcher = await self._connected()
        with self._transport():
            watch = await watcher.watch(job_id, via_inbox=False, sweep_now=True)
        return JobHandle(self, job_id, watch, watcher)

    async def abort(self, job_id: str) -> None:
        """Abort a job by id (see ``JobHandle.abort``)."""
        arq, _ = await self._connected()
        with self._transport():
            async with arq.pipeline(transaction=True) as pipe:
                pipe.set(abort_key(job_id), b"1", ex=ABORT_TTL_S)
                pipe.publish(ABORT_CHANNEL, job_id)
                await pipe.execute()

    async def generate(
        self,
        prompts: str | Sequence[str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.generate`` through the queue: outputs in prompt order.

        ``lora_request`` (and ``sampling_params``) is one value for every prompt or a list
        with one per prompt; ``None`` runs the base model. All jobs are submitted at once.
        The first failed job's typed error is raised (the other jobs still run); use
        ``submit`` to handle errors per request. ``timeout`` bounds the whole call.
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        jobs = [{"prompt": p} for p in prompt_list]
        return await self._run_all(jobs, sampling_params, lora_request, timeout)

    async def chat(
        self,
        messages: Sequence[dict | ChatMessage] | Sequence[Sequence[dict | ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        timeout: float | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat`` through the queue: one conversation (a list of
        ``{"role", "content"}`` dicts) or a list of them, each rendered by the worker with
        the model's chat template; one output per conversation, in order. Arguments
        broadcast and errors are raised as in ``generate``."""
        options = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
        }
        jobs = [{"messages": chat, **options} for chat in conversations(messages)]
        return await self._run_all(jobs, sampling_params, lora_request, timeout)

    async def _run_all(
        self,
        jobs: list[dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
        timeout: float | None,
    ) -> list[RequestOutput]:
        """Submit every job (``submit`` keyword arguments) at once; outputs in order."""
        n = len(jobs)
        params = per_prompt(sampling_params, n, "sampling_params", SamplingParams)
        loras = per_prompt(lora_request, n, "lora_request", LoRARequest)
        async with asyncio.timeout(timeout):
            handles = await asyncio.gather(
                *(
                    self.submit(sampling_params=sp, lora_request=lr, **job)
                    for job, sp, lr in zip(jobs, params, loras, strict=True)
                )
            )
            return list(await asyncio.gather(*(h.result() for h in handles)))

    async def stream(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        *,
        messages: Sequence[dict | ChatMessage] | None = None,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[str]:
        """Submit one job (a ``prompt`` or chat ``messages``) and yield its text deltas.
        Leaving the loop early aborts the job."""
        handle = await self.submit(
            prompt,
            sampling_params,
            lora_request,
            messages=messages,
            deadline=deadline,
            timeout=timeout,
        )
        try:
            async for delta in handle.stream():
                yield delta
        finally:
            if not handle.done:
                with contextlib.suppress(QueueUnavailableError):
                    await handle.abort()


def _make_job(
    prompt: str | None,
    messages: Sequence[dict | ChatMessage] | None,
    sampling_params: SamplingParams | None,
    lora_request: LoRARequest | None,
    job_id: str | None,
    deadline: float | None,
    timeout: float | None,
    **chat_options: bool,
) -> GenerateJob:
    if (prompt is None) == (messages is None):
        raise TypeError("pass a prompt or chat messages (messages=...), not both or neither")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
        raise TypeError("sampling_params must be a SamplingParams or None")
    if lora_request is not None and not isinstance(lora_request, LoRARequest):
        raise TypeError("lora_request must be a LoRARequest or None")
    if deadline is not None and timeout is not None:
        raise ValueError("pass deadline or timeout, not both")
    now = time.time()
    if timeout is not None:
        deadline = now + timeout
    if messages is None:
        content: dict = {"prompt": prompt}
    else:
        content = {"messages": chat_messages(messages), **chat_options}
    return GenerateJob(
        request_id=job_id or uuid.uuid4().hex,
        sampling_params=sampling_params or SamplingParams(),
        lora_request=lora_request,
        enqueued_at=now,
        deadline=deadline,
        **content,
    )
