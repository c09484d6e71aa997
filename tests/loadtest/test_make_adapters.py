"""`lorafleet make-adapters` writes PEFT adapters that the engine and PEFT both load and agree on."""

from __future__ import annotations

import json

import torch
from sampling_reference import greedy_continuation

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.cli import main

PROMPTS = ["make adapters", "zipf tail"]
NEW_TOKENS = 8


def _loras(made_adapters) -> list[LoRARequest]:
    folders = sorted(p for p in made_adapters.path.iterdir() if p.is_dir())
    return [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(folders)]


def test_folders_are_peft_adapters_of_the_requested_shape(made_adapters, llama_dir):
    loras = _loras(made_adapters)
    names = [f"adapter-{i:04d}" for i in range(made_adapters.count)]
    assert [lora.lora_name for lora in loras] == names
    config = json.loads((made_adapters.path / names[0] / "adapter_config.json").read_text())
    rank = made_adapters.rank
    assert config["peft_type"] == "LORA" and config["r"] == rank
    assert config["lora_alpha"] == 2 * rank and len(config["target_modules"]) == 7
    weights = [(made_adapters.path / n / "adapter_model.safetensors").read_bytes() for n in names]
    assert len(set(weights)) == len(names)


@torch.no_grad()
def test_engine_output_equals_peft_for_made_adapters(made_adapters, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loras = _loras(made_adapters)[:3]
    llm = LLM(str(llama_dir), max_loras=2, max_lora_rank=made_adapters.rank)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    requests = [lora for lora in loras for _ in PROMPTS]
    outs = llm.generate(PROMPTS * len(loras), params, requests)
    ours = [o.outputs[0].token_ids for o in outs]

    tok = AutoTokenizer.from_pretrained(llama_dir)
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, loras[0].lora_path, adapter_name=loras[0].lora_name)
    for lora in loras[1:]:
        peft.load_adapter(lora.lora_path, adapter_name=lora.lora_name)
    expected = []
    for lora in loras:
        peft.set_adapter(lora.lora_name)
        for prompt in PROMPTS:
            ids = torch.tensor([tok(prompt).input_ids])
            expected.append(
                greedy_continuation(
                    peft, ids, NEW_TOKENS, min_new_tokens=NEW_TOKENS, top_p=None, top_k=None
                )
            )
    assert ours == expected
    assert len({tuple(t) for t in ours[:: len(PROMPTS)]}) == len(loras)  # adapters differ


def test_make_adapters_rejects_bad_input(tmp_path, llama_dir, capsys):
    """A user's mistake: one line naming it, exit status 2."""
    assert (
        main(["make-adapters", "--model", str(tmp_path), "--count", "1", "--out", str(tmp_path)])
        == 2
    )
    assert "config.json" in capsys.readouterr().err
    code = main(
        ["make-adapters", "--model", str(llama_dir), "--count", "1", "--out",
         str(tmp_path / "x"), "--targets", "q_proj,lm_head"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorafleet make-adapters: unknown target modules")
    assert len(err.strip().splitlines()) == 1
