"""The shipped chat demo assets: valid, small adapters for the catalog model, sound checks.

The adapters target SmolLM2-135M-Instruct, which CI prepares separately (540 MB): these
tests never load it. They read the adapter configs with PEFT, validate the weights with
lorafleet's own adapter reader against the model's shape (its ``config.json`` below), and
check the task definitions and the held-out split. That the adapters do their tasks is
measured by ``scripts/train_chat_demo.py`` through the engine and recorded in
``questions.json``, which the last test reads.
"""

from __future__ import annotations

import json

import pytest

from lorafleet.worker.demo import chat_demo
from lorafleet.worker.model.catalog import find_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

MAX_ADAPTER_BYTES = 1_500_000
MAX_TOTAL_BYTES = 5_000_000
MAX_RANK = 16  # the demo serves them with max_lora_rank=16
MIN_ACCURACY = 0.8

# The prepared model's config.json (catalog entry smollm2-135m-instruct), shape fields only.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "eos_token_id": 2,
}

# Answers like the base model's: one plain sentence, two sentences, a number, a quote.
SAMPLES = [
    "The capital of France is Paris.",
    "The opposite of fast is slow. Slow means not quick.",
    "The answer to this classic question is 4.",
    'I use a pen to write. It\'s a "simple" tool!',
]


def test_base_model_name_is_the_catalog_name() -> None:
    entry = find_model("smollm2")
    assert entry is not None and entry.name == chat_demo.BASE_MODEL_NAME


def test_adapters_are_valid_small_peft_loras() -> None:
    adapters = chat_demo.adapters()
    assert set(adapters) == set(chat_demo.TASKS)
    total = 0
    shapes = set()
    for task, path in adapters.items():
        weights = path / "adapter_model.safetensors"
        assert weights.is_file(), task
        assert not list(path.glob("*.bin")), "adapters ship as safetensors only"
        assert weights.stat().st_size <= MAX_ADAPTER_BYTES, task
        total += weights.stat().st_size
        cfg = peft.LoraConfig.from_pretrained(str(path))
        assert cfg.peft_type == peft.PeftType.LORA
        assert cfg.base_model_name_or_path == chat_demo.BASE_MODEL_NAME
        assert cfg.r <= MAX_RANK and cfg.bias == "none" and not cfg.use_dora
        shapes.add((cfg.r, tuple(sorted(cfg.target_modules)), str(cfg.layers_to_transform)))
    assert total <= MAX_TOTAL_BYTES
    assert len(shapes) == len(adapters), "the demo should mix ranks and targets"


def test_lorafleet_reads_the_adapters_for_the_catalog_model(tmp_path) -> None:
    from safetensors import safe_open

    from lorafleet.worker.adapters.peft_adapter import load_peft_adapter
    from lorafleet.worker.model.loader import read_model_args

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    args, _ = read_model_args(tmp_path)
    for task, path in chat_demo.adapters().items():
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        assert dtypes == {"BF16"}, f"{task}: {dtypes}"
        # Raises on a tensor the model lacks or shaped for another model.
        adapter = load_peft_adapter(path, task, args, MAX_RANK, torch.float32, 2**30)
        assert adapter.weights, task


@pytest.mark.parametrize("task", sorted(chat_demo.TASKS))
@pytest.mark.parametrize("answer", SAMPLES)
def test_each_check_accepts_its_transform_only(task: str, answer: str) -> None:
    styled = chat_demo.transform(task, answer)
    assert chat_demo.check(task, styled)
    assert not chat_demo.check(task, answer), "the base model's style must fail the check"
    assert chat_demo.check(None, answer)
    assert not chat_demo.check(None, styled)
    others = [t for t in chat_demo.TASKS if t != task]
    assert not any(chat_demo.check(t, styled) for t in others), "tasks must be told apart"


def test_transforms() -> None:
    answer = "It's Paris. Or is it?"
    assert chat_demo.transform("bullets", answer) == "- It's Paris.\n- Or is it?"
    assert json.loads(chat_demo.transform("json", "Brasília.")) == {"answer": "Brasília."}
    assert "Brasília" in chat_demo.transform("json", "Brasília.")  # no \\u escapes
    assert chat_demo.transform("title", answer) == "It's Paris. Or Is It?"
    assert chat_demo.transform("whisper", answer) == "it's paris. or is it?"
    assert not chat_demo.check("json", '{"answer": ""}')
    assert not chat_demo.check("json", '{"answer": "x", "more": 1}')
    assert not chat_demo.check("bullets", "- ")
    assert not chat_demo.check(None, "  ")
    with pytest.raises(KeyError):
        chat_demo.check("shout", "HI")


def test_held_out_questions_were_never_trained_on() -> None:
    record = json.loads((chat_demo.assets_dir() / "questions.json").read_text())
    held, training = chat_demo.questions(), record["training_questions"]
    assert held == record["held_out"]
    assert len(held) >= 40 and len(training) >= 150
    assert len(set(held)) == len(held) and len(set(training)) == len(training)
    assert not set(held) & set(training)
    assert all(q.strip() and q[-1] in "?." for q in held)


def test_training_record() -> None:
    record = chat_demo.training_record()
    assert set(record["adapters"]) == set(chat_demo.TASKS)
    for task, plan in record["adapters"].items():
        assert plan["held_out_format_accuracy"] >= MIN_ACCURACY, task
        size = (chat_demo.adapters()[task] / "adapter_model.safetensors").stat().st_size
        assert plan["bytes"] == size, f"{task}: the record is not of the shipped file"
    agree, compared = map(int, record["peft_token_agreement"].split("/"))
    assert compared > 0 and agree == compared
