"""The real model (SmolLM2-135M-Instruct, prepared from the registry's wheel once and kept in
``$LORAFLEET_CACHE``) and adapters of different ranks and targets for it."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from real_model_support import REAL_ADAPTERS, chat_prompt_ids

from lorafleet.producer import LoRARequest


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The prepared SmolLM2 folder (downloaded and converted on the first run)."""
    from lorafleet.worker.catalog import prepare_model

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

    from lorafleet.worker import chat_demo
    from lorafleet.worker.synthetic import build_random_adapter

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
    """(lora or None, question, max_tokens) -> the greedy token ids of transformers + PEFT
    for that request alone (fp32, CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    base = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    state: dict = {"model": None, "loaded": set()}

    @torch.no_grad()
    def generate(lora: LoRARequest | None, question: str, max_tokens: int) -> list[int]:
        ids = torch.tensor([chat_prompt_ids(tokenizer, question)])
        if lora is None:
            model = base if state["model"] is None else state["model"]
            context = model.disable_adapter() if state["model"] is not None else nullcontext()
        else:
            if state["model"] is None:
                state["model"] = PeftModel.from_pretrained(
                    base, lora.lora_path, adapter_name=lora.lora_name
                )
            elif lora.lora_name not in state["loaded"]:
                state["model"].load_adapter(lora.lora_path, adapter_name=lora.lora_name)
            state["loaded"].add(lora.lora_name)
            state["model"].set_adapter(lora.lora_name)
            model, context = state["model"], nullcontext()
        with context:
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

    return generate
