"""The engine: requests in, one scheduled forward pass per ``step()``, token deltas out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.producer.errors import InvalidRequestError, LoraFleetError, PromptTooLongError
from lorafleet.producer.types import CompletionOutput, LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.adapter_manager import AdapterManager
from lorafleet.worker.block_manager import BlockManager
from lorafleet.worker.config import EngineConfig
from lorafleet.worker.detokenizer import Detokenizer, TokenDecoder
from lorafleet.worker.loader import load_model, read_model_args, resolve_dtype
from lorafleet.worker.model_runner import ModelRunner, kv_block_bytes
from lorafleet.worker.outputs import StepOutput, StepStats
from lorafleet.worker.sampler import SampledTokens, Sampler
from lorafleet.worker.scheduler import ScheduledBatch, Scheduler
from lorafleet.worker.sequence import PENDING_TOKEN, Sequence
from lorafleet.worker.step_layout import PendingTokens


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class InFlightStep:
    """A step queued on the device whose sampled tokens are not read back yet: the
    sequences that sample (in row order), where their ``PENDING_TOKEN`` sits in
    ``token_ids``, and the draw."""

    sampling: list[Sequence]
    indices: list[int]
    tokens: SampledTokens | None

    @property
    def rows(self) -> dict[int, int]:
        """id(sequence) -> its row in ``tokens``."""
        return {id(seq): row for row, seq in enumerate(self.sampling)}

    @property
    def draws_on_host(self) -> bool:
        """Some row draws from its request's own generator, on the host, at read-back."""
        return self.tokens is not None and bool(self.tokens.seeded)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        model_dir = Path(config.model)
        self.args, raw = read_model_args(model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, raw)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.token_decoder = TokenDecoder(self.tokenizer)
        self.model = load_model(model_dir, self.dtype, self.device)
        limit = self.args.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        block_bytes = kv_block_bytes(self.model, config.block_size, self.dtype)
        num_blocks = config.kv_cache_bytes // block_bytes
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"kv_cache_bytes={config.kv_cache_bytes} holds {num_blocks} blocks "
                f"({num_blocks * config.block_size} tokens), fewer than max_model_len="
                f"{self.max_model_len}; raise kv_cache_bytes or lower max_model_len"
            )
        name = config.served_model_name or raw.get("_name_or_path") or model_dir.name
        self.adapters = AdapterManager(self.model, config, served_model_name=name)
        self.runner = ModelRunner(self.model, self.adapters, num_blocks, config.block_size)
        if config.cuda_graphs:
            self.runner.enable_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        eos = self.args.eos_token_ids or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )
        self.eos_token_ids = frozenset(eos)
        self.sampler = Sampler(tuple(eos), config.seed)
        self.last_step = StepStats()
        self._in_flight: InFlightStep | None = None
        # A CUDA device computes while the host goes on; on the CPU the forward blocks, so
        # pipelining steps would only delay every output by one step.
        self.pipelined = config.pipelined and self.device.type == "cuda"

    # -- requests --------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True).input_ids

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                f"(prompt plus at least one generated token must fit)"
            )

    def add_request(
        self,
        request_id: str,
        prompt: str,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises a ``LoraFleetError`` if it can never be served; loads the
        adapter into the CPU cache so file errors surface here."""
        if self.scheduler.find(request_id) is not None:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams")
        ids = prompt_token_ids if prompt_token_ids is not None else self.encode(prompt)
        self.check_prompt(ids)
        if lora_request is not None:
            self.adapters.load(lora_request)
        seq = Sequence(
            request_id=request_id,
            prompt=prompt,
            token_ids=list(ids),
            num_prompt_tokens=len(ids),
            params=params,
            lora_request=lora_request,
            detokenizer=Detokenizer(self.token_decoder, tuple(params.stop or ())),
            max_total_tokens=min(len(ids) + params.max_tokens, self.max_model_len),
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
        )
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> StepOutput | None:
        """Stop a request now, freeing its blocks and slot. None if it is not known."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._finish(seq)
        return self._output(seq, [], finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Queue the next step, then return the outputs of the one before it.

        When ``pipelined`` (on CUDA), the next step is scheduled and queued before the
        previous one is read back: the GPU goes from one step to the next without waiting
        for the host, whose work per step (reading back, stop checks, detokenizing,
        building outputs) runs while the device computes. The last sampled token of each
        sequence is then still on the device when its next step is queued: it is a
        ``PENDING_TOKEN`` on the host, and the runner takes it from the previous step's
        samples on the device. A sequence ended by what is read back (a stop token, EOS, a
        stop string) has one wasted row in the queued step, whose token is dropped.
        Seeded sampling draws on the host, so a step with seeded rows is read back before
        the next one is scheduled. When not ``pipelined`` (on the CPU, where the forward
        blocks anyway), each step is read back as soon as it is queued."""
        start = time.perf_counter()
        appended: list[tuple[Sequence, int, int]] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.draws_on_host:
            appended += self._read_back(previous)
            previous = None
        batch = self.scheduler.schedule()
        outputs = [self._failed(seq, err) for seq, err in batch.failed]
        if batch.seqs:
            self._in_flight = self._launch(batch, previous)
        if previous is not None:
            appended += self._read_back(previous)
        if not self.pipelined:
            appended += self._read_back_in_flight()
        outputs.extend(self._emit(appended))
        self.last_step = StepStats(
            num_seqs=len(batch),
            num_tokens=batch.num_tokens,
            num_adapters=len({s.lora_id for s in batch.seqs if s.lora_request}),
            seconds=time.perf_counter() - start,
        )
        return outputs

    @torch.inference_mode()
    def collect(self) -> list[StepOutput]:
        """Read back the step in flight without queueing another; its outputs."""
        return self._emit(self._read_back_in_flight())

    def _launch(self, batch: ScheduledBatch, previous: InFlightStep | None) -> InFlightStep:
        """Queue ``batch`` on the device; its sequences advance by their scheduled tokens
        and each sampling one gets a ``PENDING_TOKEN`` for the token being drawn."""
        sampling = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        plan = self.sampler.plan(sampling, self.device) if sampling else None
        pending = None
        if previous is not None and previous.tokens is not None:
            rows = previous.rows
            on_device = {i: rows[id(s)] for i, s in enumerate(batch.seqs) if id(s) in rows}
            pending = PendingTokens(previous.tokens.tokens, on_device)
        logits = self.runner.execute(batch, pending)
        tokens = self.sampler.sample(logits, plan) if plan is not None else None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        indices = []
        for seq in sampling:
            indices.append(seq.num_tokens)
            seq.token_ids.append(PENDING_TOKEN)
        return InFlightStep(sampling, indices, tokens)

    def _read_back_in_flight(self) -> list[tuple[Sequence, int, int]]:
        step, self._in_flight = self._in_flight, None
        return [] if step is None else self._read_back(step)

    def _read_back(self, step: InFlightStep) -> list[tuple[Sequence, int, int]]:
        """Wait for ``step``'s samples and put them in place of its pending tokens.
        Token-level stops (stop token ids, EOS, length) finish sequences here. Returns
        (sequence, token, its index in ``token_ids``) for the tokens to report."""
        tokens = step.tokens.tolist() if step.tokens is not None else []
        appended = []
        for seq, index, token in zip(step.sampling, step.indices, tokens, strict=True):
            if seq.finished:  # aborted, or ended by what an earlier step read back
                continue
            seq.token_ids[index] = token
            if seq.first_token_time is None:
                seq.first_token_time = time.monotonic()
            self._check_token_stop(seq, token, index)
            if seq.finish_reason is not None:
                self._finish(seq)
            appended.append((seq, token, index))
        return appended

    def _finish(self, seq: Sequence) -> None:
        seq.drop_pending()  # rows queued after the end are wasted; their tokens dropped
        self.scheduler.finish(seq)

    def _check_token_stop(self, seq: Sequence, token: int, index: int) -> None:
        params = seq.params
        may_stop = index + 1 - seq.num_prompt_tokens >= params.min_tokens
        if may_stop and params.stop_token_ids and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif may_stop and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif index + 1 >= seq.max_total_tokens:
            seq.finish_reason = "length"

    def _emit(self, appended: list[tuple[Sequence, int, int]]) -> list[StepOutput]:
        """Detokenize the new tokens, apply stop strings, and build the outputs."""
        outputs = []
        for seq, token, index in appended:
            if index >= seq.num_tokens:  # the sequence ended on an earlier token
                continue
            # Whether this token ended the sequence (a later one read back in the same call
            # may have: then this one is reported as any other).
            last = seq.finished and index == seq.num_tokens - 1
            detokenizer = seq.detokenizer
            if last and seq.finish_reason == "stop":  # a stop token: not part of the text
                detokenizer.flush()
            elif (matched := detokenizer.append(token)) is not None and (
                index + 1 - seq.num_prompt_tokens >= seq.params.min_tokens
            ):  # a stop string wins over a stop or length reached by this token or later
                detokenizer.cut_at_stop()
                seq.finish_reason, seq.stop_reason = "stop", matched
                del seq.token_ids[index + 1 :]  # tokens read back after it, if any
                if not seq.finished:
                    self._finish(seq)
                last = True
            elif last:  # the length limit
                detokenizer.flush()
            outputs.append(self._output(seq, [token], finished=last))
        return outputs

    def _output(self, seq: Sequence, new_tokens: list[int], finished: bool) -> StepOutput:
        return StepOutput(
            request_id=seq.request_id,
            delta_text=seq.detokenizer.delta(final=finished),
            delta_token_ids=new_tokens,
            finished=finished,
            finish_reason=seq.finish_reason,
            output=self.request_output(seq) if finished else None,
        )

    def _failed(self, seq: Sequence, err: LoraFleetError) -> StepOutput:
        return StepOutput(seq.request_id, "", [], True, finish_reason="error", error=err)

    def request_output(self, seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=seq.detokenizer.text,
            token_ids=seq.output_token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            outputs=[completion],
            finished=seq.finished,
            lora_request=seq.lora_request,
        )
