"""In-process front end with vLLM's ``LLM.generate`` and ``LLM.chat`` semantics."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq

from lorafleet.producer.errors import InternalError, InvalidRequestError
from lorafleet.producer.types import (
    ChatMessage,
    LoRARequest,
    RequestOutput,
    SamplingParams,
    conversations,
    per_prompt,
)
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.llm_engine import LLMEngine


class LLM:
    """``LLM(model=dir, enable_lora=True, max_loras=4, max_lora_rank=64)``; other keyword
    arguments are ``EngineConfig`` fields. ``model`` may be a catalog name (``smollm2``)."""

    def __init__(self, model: str, **kwargs: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Seq[str],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion in shared batches; outputs in input order.

        Every request is validated (and its adapter loaded) before any runs: a bad one raises
        its typed ``LoraFleetError`` naming the prompt index, and nothing is left queued.
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)

        def add(rid: str, prompt: str, params: SamplingParams, lora: LoRARequest | None) -> None:
            self.engine.add_request(rid, prompt, params, lora)

        return self._run(prompt_list, sampling_params, lora_request, add)

    def chat(
        self,
        messages: Seq[dict | ChatMessage] | Seq[Seq[dict | ChatMessage]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role", "content"}`` dicts)
        or a list of conversations, each rendered by the model's chat template; one output
        per conversation, in order. ``sampling_params`` and ``lora_request`` broadcast as in
        ``generate``."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        chats = conversations(messages)

        def add(
            rid: str, chat: list[ChatMessage], params: SamplingParams, lora: LoRARequest | None
        ) -> None:
            self.engine.add_chat_request(
                rid,
                chat,
                params,
                lora,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )

        return self._run(chats, sampling_params, lora_request, add)

    def _run(
        self,
        inputs: list,
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None,
        add: Callable[[str, object, SamplingParams, LoRARequest | None], None],
    ) -> list[RequestOutput]:
        n = len(inputs)
        loras = per_prompt(lora_request, n, "lora_request", LoRARequest)
        params = [
            p or SamplingParams()
            for p in per_prompt(sampling_params, n, "sampling_params", SamplingParams)
        ]
        ids = [f"llm-{next(self._ids)}" for _ in inputs]
        try:
            for i, (rid, item, p, lora) in enumerate(zip(ids, inputs, params, loras, strict=True)):
                try:
                    add(rid, item, p, lora)
                except InvalidRequestError as err:
                    raise type(err)(f"prompt {i}: {err.message}") from None
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.error is not None:
                    raise out.error
                if out.finished:
                    results[out.request_id] = out.output
            if len(results) < len(ids) and not self.engine.has_unfinished():  # never spin
                missing = sorted(set(ids) - set(results))
                raise InternalError(f"the engine ended requests {missing} without an output")
        return [results[rid] for rid in ids]
