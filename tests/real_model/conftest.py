"""The real model (SmolLM2-135M-Instruct, prepared from the registry's wheel once and kept in
``$LORAFLEET_CACHE``) and adapters of different ranks and targets for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from real_model_support import REAL_ADAPTERS, chat_prompt_ids

from lorafleet.producer import LoRARequest


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The prepared SmolLM2 folder (downloaded and converted on the first run)."""
    from lorafleet.worker.model.catalog import prepare_model

    return prepare_model("smollm2")


@pytest.fixture(scope="session")
def real_adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-adapters")


@pytest.fixture(scope="session")
def real_adapters(real_model, real_adapter_root) -> list[LoRARequest]:
    """Two trained chat demo adapters (PEFT-saved; rank 4 on q/v, rank 16 on q/v of layers
    10-29), then random PEFT-format ones small enough that answers stay sentences (a larger
    std turns them to noise, where near-ties make greedy comparisons fragile)."""
    import shutil

    from lorafleet.worker.demo import chat_demo
    from lorafleet.worker.demo.synthetic import build_random_adapter

    made = []
    for i, task in enumerate(("json", "title")):
        # Copied under the adapters' root: a worker test allows that folder alone.
        path = shutil.copytree(chat_demo.adapters()[task], real_adapter_root / task)
        made.append(LoRARequest(task, 90 + i, str(path)))
    for i, (name, rank, targets) in enumerate(REAL_ADAPTERS):
        path = build_random_adapter(
            real_model,
            real_adapter_root / name,
            rank=rank,
            alpha=2.0 * rank,
            target_modules=targets,
            seed=900 + i,
            std=0.02,
        )
        made.append(LoRARequest(name, 100 + i, str(path)))
    return made


@pytest.fixture(scope="session")
def peft_reference(real_model):
    """[(lora or None, question)], max_tokens -> for each request, the greedy token ids of
    transformers + PEFT for it alone (fp32, CPU), in order.

    One adapter is loaded at a time (a PEFT model holding several runs each of them several
    times slower), and every request of that adapter runs before the next is loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    base = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()

    def generate(model, question: str, max_tokens: int) -> list[int]:
        ids = torch.tensor([chat_prompt_ids(tokenizer, question)])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=tokenizer.eos_token_id,
        )
        return out[0, ids.shape[1] :].tolist()

    @torch.no_grad()
    def reference(
        requests: list[tuple[LoRARequest | None, str]], max_tokens: int
    ) -> list[list[int]]:
        results: dict[int, list[int]] = {}
        by_adapter: dict[LoRARequest | None, list[int]] = {}
        for i, (lora, _) in enumerate(requests):
            by_adapter.setdefault(lora, []).append(i)
        for lora, indices in by_adapter.items():
            model = base if lora is None else PeftModel.from_pretrained(base, lora.lora_path)
            for i in indices:
                results[i] = generate(model, requests[i][1], max_tokens)
            if lora is not None:
                model.unload()  # the base model without the adapter's layers
        return [results[i] for i in range(len(requests))]

    return reference
