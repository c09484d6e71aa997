"""The engine: requests in, one scheduled forward pass per ``step()``, token deltas out."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import torch

from lorafleet.producer.errors import InvalidRequestError, LoraFleetError, PromptTooLongError
from lorafleet.producer.types import ChatMessage, Logprob, LoRARequest, SamplingParams
from lorafleet.worker.adapters.manager import AdapterManager
from lorafleet.worker.engine.block_manager import BlockManager
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.detokenizer import Detokenizer, TokenDecoder
from lorafleet.worker.engine.kv_budget import merging_fits, plan_kv_cache
from lorafleet.worker.engine.model_runner import ModelRunner
from lorafleet.worker.engine.outputs import EngineSnapshot, StepOutput, StepStats, request_output
from lorafleet.worker.engine.sampler import SampledTokens, Sampler, TokenLogprobs
from lorafleet.worker.engine.scheduler import ScheduledBatch, Scheduler
from lorafleet.worker.engine.sequence import PENDING_TOKEN, Request, Sequence
from lorafleet.worker.engine.step_layout import PendingTokens, prompt_targets
from lorafleet.worker.engine.usage import timed_load
from lorafleet.worker.model.catalog import local_model
from lorafleet.worker.model.loader import load_model, read_model_args, resolve_dtype


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def completion_seed(seed: int, index: int) -> int:
    """The seed of completion ``index`` of a seeded request: ``seed`` itself for the first
    (so ``n=1`` and the first of ``n`` agree), a hash of both for the others."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


@dataclass
class PromptScores:
    """Prompt tokens scored in one step, on the device until read back: ``targets`` lists
    (sequence, index in its ``token_ids``); ``logprobs`` float32 [P] and ``ranks`` int64
    [P] are the scored tokens', ``top_ids`` / ``top_values`` [P, k] the k most likely."""

    targets: list[tuple[Sequence, int]]
    logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor


@dataclass
class InFlightStep:
    """A step queued on the device whose sampled tokens are not read back yet: the
    sequences that sample (in row order), where their ``PENDING_TOKEN`` sits in
    ``token_ids``, the draw, and the prompt tokens scored."""

    sampling: list[Sequence]
    indices: list[int]
    tokens: SampledTokens | None
    prompt: PromptScores | None = None

    @property
    def rows(self) -> dict[int, int]:
        """id(sequence) -> its row in ``tokens``."""
        return {id(seq): row for row, seq in enumerate(self.sampling)}

    @property
    def read_back_first(self) -> bool:
        """The next step cannot be planned before this one is read back: some row draws
        from its request's own generator, on the host, or is penalized by the tokens so
        far, which the host must know."""
        if self.tokens is not None and self.tokens.seeded:
            return True
        return any(seq.params.penalized for seq in self.sampling)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        model_dir = local_model(config.model)
        self.args, raw = read_model_args(model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, raw)
        # Sized from config.json alone: a context that cannot fit fails before the weights load.
        self.kv_budget = plan_kv_cache(config, self.args, self.dtype, self.device)
        self.max_model_len = self.kv_budget.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.decoders = {skip: TokenDecoder(self.tokenizer, skip) for skip in (True, False)}
        self.model = load_model(model_dir, self.dtype, self.device)
        self.model_name = config.served_model_name or raw.get("_name_or_path") or model_dir.name
        policy = config.adapter_policy()
        merges = self.device.type == "cpu" and self.dtype == torch.float32 and config.enable_lora
        if (
            policy.merge_after_steps
            and merges
            and not merging_fits(self.args, self.dtype, self.kv_budget)
        ):
            policy = replace(policy, merge_after_steps=0)
        self.adapters = AdapterManager(self.model, policy, served_model_name=self.model_name)
        num_blocks = self.kv_budget.num_blocks
        self.runner = ModelRunner(self.model, self.adapters, num_blocks, config.block_size)
        if config.cuda_graphs:
            self.runner.enable_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        eos = self.args.eos_token_ids or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )
        self.eos_token_ids = frozenset(eos)
        self.sampler = Sampler(tuple(eos), config.seed, self.args.vocab_size)
        self.requests: dict[str, Request] = {}
        self.last_step = StepStats()
        self._in_flight: InFlightStep | None = None
        # A CUDA device computes while the host goes on; on the CPU the forward blocks, so
        # pipelining steps would only delay every output by one step.
        self.pipelined = config.pipelined and self.device.type == "cuda"

    # -- requests --------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a plain prompt, with the tokenizer's special tokens (vLLM's rule for
        ``generate``), except that a BOS the text already starts with (a prompt rendered by
        a chat template that writes one) is not doubled."""
        ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            del ids[0]
        return ids

    def render_chat(
        self,
        messages: Seq[ChatMessage],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """The conversation as the model's chat template writes it (special tokens
        included: tokenize it without adding more). Raises ``InvalidRequestError``."""
        import jinja2

        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.model_name} has no chat template: send a plain prompt instead"
            )
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise InvalidRequestError(
                f"the chat template of {self.model_name} refused the conversation: {e}"
            ) from None

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                f"(prompt plus at least one generated token must fit)"
            )

    def check_params(self, params: SamplingParams) -> None:
        """The sampling parameters' token ids must be in this model's vocabulary."""
        vocab = self.args.vocab_size
        for name, ids in (
            ("logit_bias", params.logit_bias or ()),
            ("allowed_token_ids", params.allowed_token_ids or ()),
        ):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise InvalidRequestError(
                    f"{name} names token ids {bad[:5]} outside the vocabulary of "
                    f"{self.model_name} ({vocab} tokens)"
                )

    def add_request(
        self,
        request_id: str,
        prompt: str,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
        prompt_token_ids: list[int] | None = None,
        resume_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request (``params.n`` sequences). Raises a ``LoraFleetError`` if it can
        never be served; loads the adapter into the CPU cache so file errors surface here.

        ``resume_token_ids``: output tokens an earlier run of the request already generated
        (a worker drained or killed mid-way); the request continues after them as if it had
        never stopped: they count toward ``max_tokens``, ``min_tokens``, penalties and stop
        strings, and its text starts with theirs. Ignored (the request starts over) when
        ``params`` are not ``resumable`` or no token would be left to make."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams")
        ids = prompt_token_ids if prompt_token_ids is not None else self.encode(prompt)
        self.check_prompt(ids)
        self.check_params(params)
        resumed = list(resume_token_ids or ())
        if not params.resumable or not self._room_after(len(ids), len(resumed), params):
            resumed = []  # start over: the output stays valid, only the work is repeated
        load_s = 0.0
        if lora_request is not None:
            load_s = timed_load(self.adapters, self.adapters.load, lora_request)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = [
            self._sequence(request_id, prompt, ids, params, lora_request, arrival, k)
            for k in range(params.n)
        ]
        seqs[0].adapter_load_s = load_s
        for token in resumed:
            seqs[0].token_ids.append(token)
            seqs[0].detokenizer.append(token)
        self.requests[request_id] = Request(request_id, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def add_chat_request(
        self,
        request_id: str,
        messages: Seq[ChatMessage],
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        resume_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a chat request: the conversation rendered by the model's chat template,
        tokenized without adding special tokens (the template writes its own)."""
        prompt = self.render_chat(messages, add_generation_prompt, continue_final_message)
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        self.add_request(
            request_id, prompt, params, lora_request, arrival_time, ids, resume_token_ids
        )

    def _room_after(self, num_prompt: int, num_resumed: int, params: SamplingParams) -> bool:
        """Whether a request resumed after ``num_resumed`` tokens still has one to make
        (a run on an engine with a longer context may have made more than fits here)."""
        return num_prompt + num_resumed < self.max_model_len and num_resumed < params.max_tokens

    def _sequence(
        self,
        request_id: str,
        prompt: str,
        ids: list[int],
        params: SamplingParams,
        lora_request: LoRARequest | None,
        arrival: float,
        index: int,
    ) -> Sequence:
        decoder = self.decoders[params.skip_special_tokens]
        seq = Sequence(
            request_id=request_id,
            prompt=prompt,
            token_ids=list(ids),
            num_prompt_tokens=len(ids),
            params=params,
            lora_request=lora_request,
            detokenizer=Detokenizer(decoder, tuple(params.stop or ())),
            max_total_tokens=min(len(ids) + params.max_tokens, self.max_model_len),
            arrival_time=arrival,
            index=index,
        )
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(completion_seed(params.seed, index))
        if params.logprobs is not None:
            seq.logprobs = []
        if params.prompt_logprobs is not None and index == 0:
            seq.prompt_logprobs = [None] * len(ids)
        return seq

    def abort(self, request_id: str) -> StepOutput | None:
        """Stop a request now, freeing its blocks and slots. None if it is not known."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self._finish(seq)
        first = request.seqs[0]
        return StepOutput(
            request_id=request_id,
            delta_text=first.detokenizer.delta(final=True),
            delta_token_ids=[],
            finished=True,
            finish_reason="abort",
            output=request_output(request),
        )

    def fail_all(self, error: LoraFleetError) -> list[StepOutput]:
        """End every request with ``error`` (after a failed step): one output each."""
        self._in_flight = None
        return [self._failed(request, error) for request in list(self.requests.values())]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def snapshot(self) -> EngineSnapshot:
        """The engine's gauges and counters now (for metrics and heartbeats)."""
        scheduler, adapters = self.scheduler, self.adapters
        return EngineSnapshot(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            waiting_for_slot=sum(
                1
                for s in scheduler.waiting
                if s.lora_request is not None and not adapters.has_room_for(s.lora_id)
            ),
            free_blocks=self.blocks.num_free,
            num_blocks=self.blocks.num_blocks,
            slots_in_use=adapters.slots_in_use,
            cpu_adapters=len(adapters.cpu),
            preemptions=scheduler.num_preemptions,
            adapters_in_slots=tuple(a for a in adapters.slot_owner if a is not None),
            adapters_in_cpu=tuple(adapters.cpu),
            adapters=replace(adapters.stats),
        )

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
        Seeded sampling draws on the host and penalties need the tokens so far, so a step
        with such rows is read back before the next one is scheduled. When not
        ``pipelined`` (on the CPU, where the forward blocks anyway), each step is read back
        as soon as it is queued."""
        start = time.perf_counter()
        appended: list[tuple[Sequence, int, int]] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.read_back_first:
            appended += self._read_back(previous)
            previous = None
        batch = self.scheduler.schedule()
        outputs = self._fail_admissions(batch)
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

    def _fail_admissions(self, batch: ScheduledBatch) -> list[StepOutput]:
        """Requests whose adapter could not take a slot at admission fail whole."""
        outputs = []
        for seq, err in batch.failed:
            request = self.requests.get(seq.request_id)
            if request is not None:
                outputs.append(self._failed(request, err))
        return outputs

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
        num_sampling = len(sampling)
        tokens = self.sampler.sample(logits[:num_sampling], plan) if plan is not None else None
        prompt = self._score_prompt(batch, logits[num_sampling:])
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        indices = []
        for seq in sampling:
            indices.append(seq.num_tokens)
            seq.token_ids.append(PENDING_TOKEN)
        return InFlightStep(sampling, indices, tokens, prompt)

    def _score_prompt(self, batch: ScheduledBatch, logits: torch.Tensor) -> PromptScores | None:
        """Queue the log-probabilities of the prompt tokens this step scores (``logits``
        float32 [P, vocab], in ``prompt_targets`` order)."""
        targets = [(batch.seqs[i], index) for i, index in prompt_targets(batch)]
        if not targets:
            return None
        lp = logits.log_softmax(dim=-1)
        ids = torch.tensor([seq.token_ids[index] for seq, index in targets], device=lp.device)
        chosen = lp.gather(1, ids[:, None])[:, 0]
        ranks = (lp > chosen[:, None]).sum(dim=1) + 1
        k = max(seq.params.prompt_logprobs or 0 for seq, _ in targets)
        top_values, top_ids = lp.topk(k, dim=1)
        return PromptScores(targets, chosen, ranks, top_ids, top_values)

    def _read_back_in_flight(self) -> list[tuple[Sequence, int, int]]:
        step, self._in_flight = self._in_flight, None
        return [] if step is None else self._read_back(step)

    def _read_back(self, step: InFlightStep) -> list[tuple[Sequence, int, int]]:
        """Wait for ``step``'s samples and put them in place of its pending tokens.
        Token-level stops (stop token ids, EOS, length) finish sequences here. Returns
        (sequence, token, its index in ``token_ids``) for the tokens to report."""
        tokens = step.tokens.tolist() if step.tokens is not None else []
        logprobs = step.tokens.logprobs() if step.tokens is not None else {}
        if step.prompt is not None:
            self._keep_prompt_logprobs(step.prompt)
        appended = []
        for row, (seq, index, token) in enumerate(
            zip(step.sampling, step.indices, tokens, strict=True)
        ):
            if seq.finished:  # aborted, or ended by what an earlier step read back
                continue
            seq.token_ids[index] = token
            if seq.logprobs is not None:
                seq.logprobs.append(self._sample_logprobs(token, logprobs[row], seq))
            if seq.first_token_time is None:
                seq.first_token_time = time.monotonic()
            self._check_token_stop(seq, token, index)
            if seq.finish_reason is not None:
                self._finish(seq)
            appended.append((seq, token, index))
        return appended

    def _logprob(self, token: int, value: float, rank: int) -> Logprob:
        return Logprob(value, rank, self.decoders[False]([token]))

    def _sample_logprobs(self, token: int, scored: TokenLogprobs, seq: Sequence) -> dict:
        """The sampled token's entry, then the request's top-k (vLLM's layout)."""
        entry = {token: self._logprob(token, scored.logprob, scored.rank)}
        for rank, (top, value) in enumerate(scored.top[: seq.params.logprobs], start=1):
            entry.setdefault(top, self._logprob(top, value, rank))
        return entry

    def _keep_prompt_logprobs(self, scores: PromptScores) -> None:
        rows = zip(
            scores.targets,
            scores.logprobs.tolist(),
            scores.ranks.tolist(),
            scores.top_ids.tolist(),
            scores.top_values.tolist(),
            strict=True,
        )
        for (seq, index), value, rank, top_ids, top_values in rows:
            token = seq.token_ids[index]
            entry = {token: self._logprob(token, value, rank)}
            k = seq.params.prompt_logprobs or 0
            for r, (top, v) in enumerate(zip(top_ids[:k], top_values[:k], strict=True), 1):
                entry.setdefault(top, self._logprob(top, v, r))
            seq.prompt_logprobs[index] = entry

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
        """Detokenize the new tokens, apply stop strings, and build the outputs; a request
        whose last sequence ended gets its final output on its last delta of the call."""
        outputs: list[StepOutput] = []
        last_of: dict[str, int] = {}  # request id -> index of its last output in ``outputs``
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
                detokenizer.cut_at_stop(seq.params.include_stop_str_in_output)
                seq.finish_reason, seq.stop_reason = "stop", matched
                del seq.token_ids[index + 1 :]  # tokens read back after it, if any
                if seq.logprobs is not None:
                    del seq.logprobs[index + 1 - seq.num_prompt_tokens :]
                if not seq.finished:
                    self._finish(seq)
                last = True
            elif last:  # the length limit
                detokenizer.flush()
            last_of[seq.request_id] = len(outputs)
            outputs.append(
                StepOutput(
                    request_id=seq.request_id,
                    delta_text=detokenizer.delta(final=last),
                    delta_token_ids=[token],
                    finished=False,
                    finish_reason=seq.finish_reason,
                    index=seq.index,
                )
            )
        for request_id, at in last_of.items():
            request = self.requests.get(request_id)
            if request is not None and request.finished:
                del self.requests[request_id]
                outputs[at].finished = True
                outputs[at].output = request_output(request)
        return outputs

    def _failed(self, request: Request, err: LoraFleetError) -> StepOutput:
        """End ``request`` with ``err``: its sequences finish, its output is the error."""
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            if not seq.finished:
                self._finish(seq)
        return StepOutput(request.request_id, "", [], True, finish_reason="error", error=err)
