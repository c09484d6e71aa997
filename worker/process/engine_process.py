"""The engine process: one ``LLMEngine`` stepping in a process of its own.

Started by ``AsyncEngine`` as ``python -m lorafleet.worker.process.engine_process FD`` with one end
of a socket pair. It owns the device; the worker process keeps its event loop (Redis, arq,
streams, metrics) free of the engine's Python work, which on a shared GIL halved the
worker's throughput (vLLM V1 splits its engine core out for the same reason).

Loop: take whatever commands have arrived (block only when there is nothing to step), run
one step, send its outputs with a snapshot of the engine's counters. The process exits when
told to, or when the worker's end of the socket closes (the worker died): it never
outlives its worker. SIGINT and SIGTERM are ignored, since a terminal's Ctrl-C or a
supervisor's SIGTERM reaches the whole process group and the worker drains first, then
stops the engine itself.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from dataclasses import replace

from lorafleet.producer.errors import InternalError, LoraFleetError
from lorafleet.worker.adapters.prefetch import Prefetcher
from lorafleet.worker.engine.kv_budget import KVBudgetError
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.outputs import StepOutput
from lorafleet.worker.model.catalog import ModelPrepareError
from lorafleet.worker.process import link

log = logging.getLogger(__name__)

#: Seconds an idle engine waits between looks at a read ahead under way.
PREFETCH_POLL_S = 0.005


class EngineLoop:
    """Applies commands to the engine and steps it; returns what the worker must hear."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.stopped = False
        config = engine.config
        self.prefetcher = (
            Prefetcher(engine.adapters) if config.enable_lora and config.prefetch_adapters else None
        )

    def apply(self, commands: list[link.Command]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for cmd in commands:
            if isinstance(cmd, link.AddRequest):
                out = self._add(cmd)
                if out is not None:
                    outputs.append(out)
            elif isinstance(cmd, link.AbortRequest):
                out = self.engine.abort(cmd.request_id)
                if out is not None:
                    outputs.append(out)
            elif isinstance(cmd, link.PrefetchAdapters):
                if self.prefetcher is not None:
                    self.prefetcher.request(cmd.loras)
            elif isinstance(cmd, link.Shutdown):
                self.stopped = True
            else:
                raise TypeError(f"unknown engine command {cmd!r}")
        return outputs

    def _add(self, cmd: link.AddRequest) -> StepOutput | None:
        engine = self.engine
        try:
            if cmd.lora_request is not None:
                engine.adapters.check(cmd.lora_request)
            if cmd.messages is None:
                engine.add_request(
                    cmd.request_id,
                    cmd.prompt,
                    cmd.sampling_params,
                    cmd.lora_request,
                    cmd.arrival_time,
                    resume_token_ids=cmd.resume_token_ids,
                )
            else:
                engine.add_chat_request(
                    cmd.request_id,
                    cmd.messages,
                    cmd.sampling_params,
                    cmd.lora_request,
                    cmd.arrival_time,
                    cmd.add_generation_prompt,
                    cmd.continue_final_message,
                    cmd.resume_token_ids,
                )
        except LoraFleetError as err:
            return _failed(cmd.request_id, err)
        except Exception as e:  # a bug: fail this request, keep the engine serving the rest
            log.exception("adding request %s failed", cmd.request_id)
            return _failed(cmd.request_id, InternalError(f"adding the request failed: {e!r}"))
        return None

    def step(self) -> list[StepOutput]:
        try:
            return self.engine.step()
        except Exception as e:  # a bug or device error: fail in-flight requests, live on
            log.exception("engine step failed")
            return self.engine.fail_all(InternalError(f"engine step failed: {e!r}"))


def _failed(request_id: str, err: LoraFleetError) -> StepOutput:
    return StepOutput(request_id, "", [], True, "error", error=err)


def serve(sock: socket.socket) -> int:
    """Load the engine from the first frame's config, then serve until told to stop or the
    worker goes away. Returns the exit status."""
    inbox = link.FrameReader(sock)
    frames = inbox.read(wait=True)
    if frames is None:
        return 0
    config, backlog = frames[0], frames[1:]
    try:
        engine = LLMEngine(config)
    except (KVBudgetError, ModelPrepareError, OSError, ValueError) as e:
        # A setting or a model folder that cannot work: the worker says so in one line.
        sock.sendall(link.pack(link.EngineFailed(str(e))))
        return 1
    except Exception as e:
        log.exception("loading the engine failed")
        sock.sendall(link.pack(link.EngineFailed(f"{type(e).__name__}: {e}")))
        return 1
    budget = engine.kv_budget
    info = link.EngineInfo(
        config=replace(config, device=str(engine.device)),
        max_model_len=engine.max_model_len,
        dtype=str(engine.dtype).removeprefix("torch."),
        model_name=engine.model_name,
        kv_cache_tokens=budget.num_tokens,
        kv_cache_bytes=budget.cache_bytes,
        kv_cache_source=budget.source,
    )
    sock.sendall(link.pack(link.EngineReady(info)))
    loop = EngineLoop(engine)
    prefetcher = loop.prefetcher
    while True:
        outputs = loop.apply([c for batch in backlog for c in batch])
        if loop.stopped:
            if prefetcher is not None:
                prefetcher.close()
            return 0
        # Reads ahead that finished go into the CPU cache here, on the engine's thread.
        prefetched = prefetcher.collect() if prefetcher is not None else 0
        stats = None
        if engine.has_unfinished():
            outputs.extend(loop.step())
            stats = engine.last_step
        if outputs or stats is not None or prefetched:
            sock.sendall(link.pack(link.EngineUpdate(outputs, stats, engine.snapshot())))
        reading = prefetcher is not None and prefetcher.busy
        if reading and not engine.has_unfinished():
            time.sleep(PREFETCH_POLL_S)  # idle, a read under way: look again shortly
        backlog = inbox.read(wait=not engine.has_unfinished() and not reading)
        if backlog is None:  # the worker is gone
            return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s engine[%(process)d]: %(message)s"
    )
    sock = socket.socket(fileno=int(argv[0]))
    try:
        return serve(sock)
    except (BrokenPipeError, ConnectionResetError):  # the worker died mid-send
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
