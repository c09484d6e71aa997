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
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from redis.asyncio.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    InvalidResponse,
    RedisError,
    ResponseError,
    WatchError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from lorafleet.producer.codec import GenerateJob, JobResult, arq_deserialize, arq_serialize, encode
from lorafleet.producer.errors import (
    InternalError,
    QueueUnavailableError,
    RedisURLError,
    StreamRestartedError,
    error_from_info,
)
from lorafleet.producer.keys import (
    ABORT_CHANNEL,
    DEFAULT_QUEUE,
    GENERATE_FUNCTION,
    abort_key,
)
from lorafleet.producer.ledger import UsageReport, read_usage
from lorafleet.producer.quotas import (
    Quota,
    QuotaTenants,
    admit,
    forget_if_finished,
    get_quotas,
    set_quota,
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
from lorafleet.producer.usage import check_tenant
from lorafleet.producer.watch import REDIS_ERRORS, JobWatch, StreamWatcher

#: Environment variable naming the Redis URL when none is passed.
URL_ENV = "LORAFLEET_REDIS_URL"
DEFAULT_URL = "redis://localhost:6379/0"

#: How long an abort request is remembered for a job that has not started yet.
ABORT_TTL_S = 86_400

#: What to do when nothing answers at the URL.
_ELSEWHERE_HINT = f"pass --redis-url / set {URL_ENV}"
_START_HINT = f"start Redis or {_ELSEWHERE_HINT}"


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


def check_url(url: str) -> None:
    """Raise ``RedisURLError`` (a ``ValueError``) for a URL that redis-py would refuse when
    connecting or read other than written: a scheme other than ``redis://``, ``rediss://``
    or ``unix://``, a port or option value that is not a number, a database (the path)
    that is not a number (redis-py would silently use database 0). The message names the
    URL with its password masked."""
    try:
        shown = redact_url(url)
    except ValueError as e:  # urlsplit refuses an unbalanced "[" (an IPv6 host)
        raise RedisURLError(f"Redis URL is not valid: {e}") from e
    if not url.startswith(("redis://", "rediss://", "unix://")):
        hint = f"; did you mean 'redis://{shown}'?" if "://" not in url else ""
        raise RedisURLError(
            f"Redis URL must start with redis://, rediss:// or unix://, got {shown!r}{hint}"
        )
    try:
        options = parse_url(url)
    except ValueError as e:
        raise RedisURLError(f"Redis URL {shown!r} is not valid: {e}") from e
    database = urlsplit(url).path.strip("/")
    if not url.startswith("unix://") and database and "db" not in options:
        raise RedisURLError(
            f"Redis URL {shown!r} names database {database!r}: a database is a number "
            "(redis://host:6379/0)"
        )


def _connect_failure(error: BaseException) -> tuple[str, str]:
    """(why, what to do) for a connection that failed at the socket, read from the OS
    error under redis-py's (whose own message repeats the address and errno)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"its TLS certificate is not trusted: {cause.verify_message}",
                "name the CA that signed it in the URL (?ssl_ca_certs=/path/to/ca.pem)",
            )
        if isinstance(cause, socket.gaierror):
            return f"host not found: {cause.strerror.lower()}", f"check it or {_ELSEWHERE_HINT}"
        if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError):
            # asyncio reports a host with several addresses (localhost: ::1 and 127.0.0.1)
            # as one errno-less "Multiple exceptions: [Errno 111] ..., [Errno 111] ...".
            listed = re.findall(r"\[Errno (\d+)\]", str(cause))
            codes = {cause.errno} if cause.errno else {int(code) for code in listed}
            if len(codes) == 1:
                return os.strerror(codes.pop()).lower(), _START_HINT
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__, _START_HINT


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
        ``TimeoutError`` (with a message naming the job) after ``timeout`` seconds; the job
        keeps running, and ``result()`` may be called again."""
        async with _time_limit(
            timeout,
            lambda: (
                f"job {self.job_id} is not done after {timeout:g}s; it keeps running: "
                "call result() again to wait longer, or abort() it"
            ),
        ):
            result = await self._watch.wait_done()
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
        # aclosing: when the caller stops early, end `_deltas` here rather than leave it to
        # the event loop's finalizer (a task of its own, run whenever it is collected).
        async with self._watcher.follow(self._watch), contextlib.aclosing(self._deltas()) as deltas:
            async for delta in deltas:
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
    when Redis does not answer within ``connect_timeout`` seconds, refuses the connection,
    the login or the URL's database, with a one-line message that names the URL (password
    masked) and what to do. A malformed URL raises ``RedisURLError`` (a ``ValueError``)
    here, before anything connects. ``max_connections`` bounds the pool used for
    enqueueing; waiting on results uses one more connection.
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
        check_url(self.url)
        # How messages name the server; a URL from the environment says so, as the user
        # may not know that the variable is set.
        origin = f" (from ${URL_ENV})" if not url and os.environ.get(URL_ENV) else ""
        self._where = f"Redis at {redact_url(self.url)}{origin}"
        self.queue_name = queue_name
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.client_id = uuid.uuid4().hex
        self._arq: ArqRedis | None = None
        self._reader: aioredis.Redis | None = None
        self._watcher: StreamWatcher | None = None
        self._connecting = asyncio.Lock()
        self._quota_tenants: QuotaTenants | None = None  # set on connect
        # Handles of `stream()` loops not yet ended: close() aborts their jobs.
        self._open_streams: set[JobHandle] = set()

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
            why, _ = _connect_failure(e)
            raise QueueUnavailableError(f"{self._where} is unavailable ({why})") from e

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
            async with asyncio.timeout(self.connect_timeout):
                await arq.ping()
        except BaseException as e:
            await arq.aclose(close_connection_pool=True)
            if isinstance(e, RedisError | OSError):
                raise await self._connect_error(e) from e
            raise
        block_ms = 1000
        # Blocking reads need their own connection and a socket timeout beyond the block.
        self._reader = aioredis.Redis.from_url(
            self.url,
            single_connection_client=True,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=block_ms / 1000 + self.connect_timeout,
        )
        self._quota_tenants = QuotaTenants(arq)
        self._watcher = StreamWatcher(
            self._reader,
            arq,
            self.client_id,
            block_ms=block_ms,
            reconnect_s=self.connect_timeout,
        )
        self._arq = arq

    async def _connect_error(self, error: RedisError | OSError) -> QueueUnavailableError:
        """The one-line error for a failed first connection: what went wrong and what to do."""
        where = self._where
        if isinstance(error, TimeoutError | RedisTimeoutError):  # builtin: asyncio.timeout's
            message = (
                f"{where} did not answer within {self.connect_timeout:g}s: check the host "
                "and port, and that Redis is up"
            )
        elif isinstance(error, AuthenticationError):  # before ConnectionError: a subclass
            why = str(error).rstrip(".")
            message = f"{where} refused the login ({why}): check the user and password"
        elif isinstance(error, ResponseError) and "DB index is out of range" in str(error):
            db = parse_url(self.url).get("db", 0)
            count = await self._database_count()
            has = f" (it has {count}: 0 to {count - 1})" if count else ""
            message = f"{where}: database {db} does not exist on this server{has}"
        elif isinstance(error, InvalidResponse):
            message = f"{where} does not answer like Redis ({error}): check the host and port"
        elif isinstance(error, ResponseError):
            message = f"{where} refused the connection: {error}"
        else:
            why, hint = _connect_failure(error)
            message = f"{where} is unavailable ({why}): {hint}"
        return QueueUnavailableError(message)

    async def _database_count(self) -> int | None:
        """How many databases the server has (``CONFIG GET databases``, asked on database
        0), or None if it will not say (managed Redis often disables CONFIG)."""
        probe = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.connect_timeout,
        )
        # The URL's database is the one that does not exist; the URL wins over a keyword.
        probe.connection_pool.connection_kwargs["db"] = 0
        try:
            async with asyncio.timeout(self.connect_timeout):
                reply = await probe.config_get("databases")
            return int(next(iter(reply.values())))
        except (RedisError, OSError, StopIteration, ValueError):
            return None
        finally:
            await probe.aclose(close_connection_pool=True)

    async def close(self) -> None:
        """Stop waiting on jobs (their handles fail) and close connections. Jobs keep
        running on the workers, except those of ``stream()`` loops not ended yet: nobody
        can read them any more, so they are aborted, as leaving such a loop does.

        Quiet and complete: no task or connection of this client outlives it, and a
        ``stream()`` generator that the event loop finalizes later (an ``async for`` left
        with ``break`` is closed only when collected) neither aborts again nor reconnects.
        """
        left, self._open_streams = self._open_streams, set()
        unfinished = [handle.job_id for handle in left if not handle.done]
        if unfinished and self._arq is not None:
            with contextlib.suppress(QueueUnavailableError):
                await self._send_aborts(self._arq, unfinished)
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
        tenant: str | None = None,
    ) -> JobHandle:
        """Enqueue one generation job and return its handle.

        Pass a ``prompt``, or ``messages`` (one conversation of ``{"role", "content"}``
        dicts) for a chat job: the worker renders them with the model's chat template
        (``add_generation_prompt`` and ``continue_final_message`` as in vLLM's
        ``LLM.chat``). ``job_id`` is an idempotency key: submitting an id that is queued,
        running or finished (result still kept) returns a handle to that job instead of a
        new one. ``deadline`` (Unix time) or ``timeout`` (seconds from now): past it the job
        fails with ``DeadlineExceededError``, without GPU work if it has not started.
        ``tenant`` names who the job runs for (metering and quotas; ``ValueError`` if it is
        not a valid tenant name, see ``lorafleet.producer.usage``); a job its tenant's quota
        refuses raises ``QuotaExceededError`` and is not enqueued.
        """
        job = _make_job(
            prompt,
            messages,
            sampling_params,
            lora_request,
            job_id,
            deadline,
            timeout,
            tenant,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        arq, watcher = await self._connected()
        job = msgspec.structs.replace(job, reply_to=watcher.inbox)
        with self._transport():
            admitted = job.tenant is not None and await self._has_quota(job.tenant)
            if admitted:
                refusal = await admit(arq, job.tenant, job.request_id)
                if refusal is not None:
                    raise refusal
            enqueued = await arq.enqueue_job(
                GENERATE_FUNCTION,
                encode(job),
                _job_id=job.request_id,
                _queue_name=self.queue_name,
            )
            # A job that already existed replies elsewhere and may have finished long ago.
            fresh = enqueued is not None
            if not fresh and admitted:
                # A finished one must not hold the place its resubmission just took.
                await forget_if_finished(arq, job.tenant, job.request_id)
            watch = await watcher.watch(job.request_id, via_inbox=fresh, sweep_now=not fresh)
        return JobHandle(self, job.request_id, watch, watcher, n=job.sampling_params.n)

    async def _has_quota(self, tenant: str) -> bool:
        assert self._quota_tenants is not None
        return await self._quota_tenants.has_quota(tenant)

    async def job(self, job_id: str) -> JobHandle:
        """A handle to a job submitted earlier (by any client)."""
        _, watcher = await self._connected()
        with self._transport():
            watch = await watcher.watch(job_id, via_inbox=False, sweep_now=True)
        return JobHandle(self, job_id, watch, watcher)

    async def abort(self, job_id: str) -> None:
        """Abort a job by id (see ``JobHandle.abort``)."""
        arq, _ = await self._connected()
        await self._send_aborts(arq, [job_id])

    async def usage(
        self,
        *,
        since: str | float | datetime | None = None,
        until: str | float | datetime | None = None,
        by: str | Sequence[str] = "tenant,adapter",
    ) -> UsageReport:
        """The usage ledger between ``since`` and ``until``, grouped ``by`` tenant, adapter or
        both, with the waste per worker (see ``lorafleet.producer.ledger.read_usage``)."""
        arq, _ = await self._connected()
        with self._transport():
            return await read_usage(arq, since=since, until=until, by=by)

    async def set_quota(
        self,
        tenant: str,
        *,
        max_in_flight: int | None = None,
        tokens_per_minute: int | None = None,
        clear: Sequence[str] = (),
    ) -> Quota:
        """Set ``tenant``'s limits (those given; ``clear`` removes the named ones) and return
        its quota (see ``lorafleet.producer.quotas``)."""
        arq, _ = await self._connected()
        if self._quota_tenants is not None:
            self._quota_tenants.invalidate()  # this client's next submit sees it at once
        with self._transport():
            return await set_quota(
                arq,
                tenant,
                max_in_flight=max_in_flight,
                tokens_per_minute=tokens_per_minute,
                clear=tuple(clear),
            )

    async def quotas(self, tenants: Sequence[str] | None = None) -> list[Quota]:
        """The quotas of ``tenants`` (default: every tenant that has one)."""
        arq, _ = await self._connected()
        with self._transport():
            return await get_quotas(arq, list(tenants) if tenants is not None else None)

    async def _send_aborts(self, arq: ArqRedis, job_ids: Sequence[str]) -> None:
        with self._transport():
            async with arq.pipeline(transaction=True) as pipe:
                for job_id in job_ids:
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
        tenant: str | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.generate`` through the queue: outputs in prompt order.

        ``lora_request`` (and ``sampling_params``) is one value for every prompt or a list
        with one per prompt; ``None`` runs the base model. All jobs are submitted at once.
        The first failed job's typed error is raised (the other jobs still run); use
        ``submit`` to handle errors per request. ``timeout`` bounds the whole call.
        ``tenant`` applies to every job (see ``submit``).
        """
        check_tenant(tenant)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        jobs = [{"prompt": p, "tenant": tenant} for p in prompt_list]
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
        tenant: str | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat`` through the queue: one conversation (a list of
        ``{"role", "content"}`` dicts) or a list of them, each rendered by the worker with
        the model's chat template; one output per conversation, in order. Arguments
        broadcast and errors are raised as in ``generate``; ``tenant`` as in ``submit``."""
        check_tenant(tenant)
        options = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "tenant": tenant,
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
        async with _time_limit(
            timeout,
            lambda: (
                f"not all of the {n} job(s) were done after {timeout:g}s; the unfinished "
                "ones keep running on the workers (submit() gives a handle to wait on each)"
            ),
        ):
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
        tenant: str | None = None,
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
            tenant=tenant,
        )
        self._open_streams.add(handle)
        try:
            async with contextlib.aclosing(handle.stream()) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            # Not in the set: close() took it and aborted the job already; aborting again
            # would reconnect a closed client.
            if handle in self._open_streams:
                self._open_streams.discard(handle)
                if not handle.done:
                    with contextlib.suppress(QueueUnavailableError):
                        await handle.abort()


@contextlib.asynccontextmanager
async def _time_limit(seconds: float | None, message: Callable[[], str]) -> AsyncIterator[None]:
    """``asyncio.timeout(seconds)`` whose ``TimeoutError`` says what timed out (asyncio's
    own has no message). A ``TimeoutError`` from inside (a job's ``DeadlineExceededError``)
    passes unchanged."""
    timer = asyncio.timeout(seconds)
    try:
        async with timer:
            yield
    except TimeoutError:
        if not timer.expired():
            raise
        raise TimeoutError(message()) from None


def _make_job(
    prompt: str | None,
    messages: Sequence[dict | ChatMessage] | None,
    sampling_params: SamplingParams | None,
    lora_request: LoRARequest | None,
    job_id: str | None,
    deadline: float | None,
    timeout: float | None,
    tenant: str | None,
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
    check_tenant(tenant)
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
        tenant=tenant,
        **content,
    )
