"""lorafleet on the shipped demo assets: equal to PEFT, and each adapter does its task."""

from __future__ import annotations

import torch

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.demo.demo_assets import (
    BASE_TASK,
    demo_lora_requests,
    demo_model_dir,
    demo_prompt,
    expected_output,
    held_out_words,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0)


def _requests() -> dict[str, LoRARequest]:
    return demo_lora_requests(base_model_name="lorafleet-demo")


def test_demo_mixed_batch_equals_peft_and_is_accurate():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loras = _requests()
    words = held_out_words()[:24]
    tasks = [BASE_TASK, *loras]
    jobs = [(w, tasks[i % len(tasks)]) for i, w in enumerate(words * 2)]
    # Two slots for four adapters: the mixed call evicts and reloads slots as it runs.
    llm = LLM(
        str(demo_model_dir()), max_loras=2, max_lora_rank=16, served_model_name="lorafleet-demo"
    )
    outs = llm.generate([demo_prompt(w) for w, _ in jobs], GREEDY, [loras.get(t) for _, t in jobs])
    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()
    names = sorted(loras)
    peft = PeftModel.from_pretrained(base, loras[names[0]].lora_path, adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(loras[name].lora_path, adapter_name=name)
    correct = dict.fromkeys(tasks, 0)
    for (word, task), out in zip(jobs, outs, strict=True):
        ids = torch.tensor([tok(demo_prompt(word)).input_ids])
        with torch.no_grad():
            if task == BASE_TASK:
                with peft.disable_adapter():
                    ref = peft.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
            else:
                peft.set_adapter(task)
                ref = peft.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), (word, task)
        correct[task] += out.outputs[0].text == expected_output(task, word)
    per_task = len(jobs) // len(tasks)
    for task, n in correct.items():
        assert n >= 0.9 * per_task, (task, n, per_task)
