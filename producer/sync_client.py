"""Blocking producer client for plain (non-async) code.

``SyncClient`` runs an ``asyncio`` ``Client`` on a private event loop in a daemon thread and
waits on its futures. It therefore also works where the calling thread already runs a loop
(Jupyter, an async web framework's sync handler), where ``asyncio.run`` would refuse.

Example::

    with SyncClient("redis://localhost:6379/0") as client:
        outs = client.generate(prompts, SamplingParams(max_tokens=32), lora_request=[None, sql])
        outs = client.chat([{"role": "user", "content": "Hi"}], lora_request=sql)
        for text in client.stream("Convert to SQL: ...", lora_request=sql):
            print(text, end="")
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Self, TypeVar

from lorafleet.producer.client import Client, JobHandle
from lorafleet.producer.ledger import UsageReport
from lorafleet.producer.quotas import Quota
from lorafleet.producer.types import ChatMessage, LoRARequest, RequestOutput, SamplingParams

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="lorafleet-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait. Ctrl-C in the caller cancels it. Raises
        ``RuntimeError`` once the loop is stopped (its client was closed)."""
        if self.loop.is_closed():
            coro.close()  # never run: without this, Python warns that it was never awaited
            raise RuntimeError("this SyncClient is closed: create a new one")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _shutdown(client: Client, runner: _LoopThread) -> None:
    if not runner.loop.is_closed():
        runner.run(client.close())
        runner.stop()


class SyncJobHandle:
    """Blocking view of a ``JobHandle``. Keeps its ``SyncClient`` (and thread) alive."""

    def __init__(self, handle: JobHandle, client: SyncClient) -> None:
        self._handle = handle
        self._client = client
        self._runner = client._runner
        self.job_id = handle.job_id

    @property
    def done(self) -> bool:
        return self._handle.done

    def result(self, timeout: float | None = None) -> RequestOutput:
        """See ``JobHandle.result``."""
        return self._runner.run(self._handle.result(timeout))

    def stream(self) -> Iterator[str]:
        """See ``JobHandle.stream``."""
        return _iterate(self._handle.stream(), self._client)

    def abort(self) -> None:
        self._runner.run(self._handle.abort())

    def __repr__(self) -> str:
        return f"<SyncJobHandle {self.job_id} done={self.done}>"


def _iterate(agen: AsyncIterator[str], client: SyncClient) -> Iterator[str]:
    """Drive an async generator from sync code, closing it if the caller stops early."""
    runner = client._runner
    try:
        while True:
            try:
                yield runner.run(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None and not runner.loop.is_closed():
            runner.run(aclose())


class SyncClient:
    """Blocking client; same arguments and methods as ``Client``. Use as a context manager
    or call ``close()``."""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self._client = Client(url, **kwargs)  # validates arguments before a thread starts
        self._runner = _LoopThread()
        # A client dropped without close() is still closed when collected (or at exit).
        self._finalizer = weakref.finalize(self, _shutdown, self._client, self._runner)
        self.url = self._client.url

    def connect(self) -> Self:
        self._runner.run(self._client.connect())
        return self

    def close(self) -> None:
        """Close connections and stop the thread (jobs keep running on the workers)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        **kwargs: Any,
    ) -> SyncJobHandle:
        """See ``Client.submit``."""
        handle = self._runner.run(
            self._client.submit(prompt, sampling_params, lora_request, **kwargs)
        )
        return SyncJobHandle(handle, self)

    def job(self, job_id: str) -> SyncJobHandle:
        return SyncJobHandle(self._runner.run(self._client.job(job_id)), self)

    def abort(self, job_id: str) -> None:
        self._runner.run(self._client.abort(job_id))

    def generate(
        self,
        prompts: str | Sequence[str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        *,
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> list[RequestOutput]:
        """See ``Client.generate``."""
        return self._runner.run(
            self._client.generate(
                prompts, sampling_params, lora_request, timeout=timeout, tenant=tenant
            )
        )

    def chat(
        self,
        messages: Sequence[dict | ChatMessage] | Sequence[Sequence[dict | ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        """See ``Client.chat``."""
        return self._runner.run(
            self._client.chat(messages, sampling_params, lora_request, **kwargs)
        )

    def set_quota(self, tenant: str, **kwargs: Any) -> Quota:
        """See ``Client.set_quota``."""
        return self._runner.run(self._client.set_quota(tenant, **kwargs))

    def quotas(self, tenants: Sequence[str] | None = None) -> list[Quota]:
        """See ``Client.quotas``."""
        return self._runner.run(self._client.quotas(tenants))

    def usage(self, **kwargs: Any) -> UsageReport:
        """See ``Client.usage``."""
        return self._runner.run(self._client.usage(**kwargs))

    def stream(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """See ``Client.stream``."""
        return _iterate(self._client.stream(prompt, sampling_params, lora_request, **kwargs), self)
