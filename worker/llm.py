"""In-process front end with vLLM's ``LLM.generate`` semantics."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from lorafleet.producer.errors import InternalError, InvalidRequestError
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.config import EngineConfig
from lorafleet.worker.engine import LLMEngine


def per_prompt_loras(
    num_prompts: int, lora_request: LoRARequest | Seq[LoRARequest | None] | None
) -> list[LoRARequest | None]:
    """One LoRARequest (or None) for every prompt; a list must match the prompts 1:1."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    loras = list(lora_request)
    if len(loras) != num_prompts:
        raise ValueError(
            f"lora_request has {len(loras)} entries for {num_prompts} prompts; "
            f"pass one LoRARequest, or a list with one entry (or None) per prompt"
        )
    return loras


class LLM:
    """``LLM(model=dir, enable_lora=True, max_loras=4, max_lora_rank=64)``; other keyword
    arguments are ``EngineConfig`` fields."""

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
        loras = per_prompt_loras(len(prompt_list), lora_request)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_list):
                raise ValueError(f"{len(params)} sampling_params for {len(prompt_list)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompt_list]
        try:
            for i, (rid, prompt, p, lora) in enumerate(
                zip(ids, prompt_list, params, loras, strict=True)
            ):
                try:
                    self.engine.add_request(rid, prompt, p, lora)
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
