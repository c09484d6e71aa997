"""The shipped demo assets load in transformers + PEFT and do their tasks.

Reference check for ``lorafleet demo``: with plain transformers + PEFT greedy decoding the
base model copies held-out words and each adapter computes its own task, all at >= 90%.
Everything runs offline on CPU in a few seconds (tiny model, one batch per task).
"""

from __future__ import annotations

import json

import pytest

from lorafleet.worker.demo.demo_assets import (
    BASE_MODEL_NAME,
    BASE_TASK,
    MAX_WORD_LEN,
    MIN_WORD_LEN,
    TASKS,
    demo_adapters,
    demo_model_dir,
    demo_prompt,
    expected_output,
    held_out_words,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def tokenizer():
    # local_files_only: the shipped assets must never need the hub.
    return transformers.AutoTokenizer.from_pretrained(str(demo_model_dir()), local_files_only=True)


@pytest.fixture(scope="module")
def peft_model():
    """The base with every shipped adapter loaded (``disable_adapter()`` gives the base)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(demo_model_dir()), dtype=torch.float32, local_files_only=True
    )
    adapters = demo_adapters()
    first, *rest = adapters
    model = peft.PeftModel.from_pretrained(base, str(adapters[first]), adapter_name=first)
    for name in rest:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def _generate(model, tokenizer, words: list[str]) -> list[str]:
    """Greedy completions for ``words``, one left-padded batch."""
    enc = tokenizer([demo_prompt(w) for w in words], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=12)
    new = out[:, enc["input_ids"].shape[1] :]
    # Every answer must stop with EOS, or the server would run to max_tokens.
    assert all((row == tokenizer.eos_token_id).any() for row in new), "missing EOS"
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def _accuracy(task: str, words: list[str], outputs: list[str]) -> float:
    right = sum(o == expected_output(task, w) for w, o in zip(words, outputs, strict=True))
    return right / len(words)


def test_assets_layout() -> None:
    adapters = demo_adapters()
    assert set(adapters) == set(TASKS) - {BASE_TASK}
    assert (demo_model_dir() / "model.safetensors").is_file()
    ranks = set()
    for path in adapters.values():
        assert (path / "adapter_model.safetensors").is_file()
        assert not list(path.glob("*.bin")), "adapters ship as safetensors only"
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == BASE_MODEL_NAME
        ranks.add(cfg["r"])
    assert len(ranks) > 1, "the demo should mix adapter ranks"
    words = held_out_words()
    assert len(words) >= 50
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    assert all(MIN_WORD_LEN <= len(w) <= MAX_WORD_LEN for w in words)


def test_tokenizer_round_trips(tokenizer) -> None:
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerBase)
    enc = tokenizer(demo_prompt("hello"))["input_ids"]
    # BOS + one token per character.
    assert enc[0] == tokenizer.bos_token_id and len(enc) == 1 + len("hello>")
    assert tokenizer.decode(enc, skip_special_tokens=True) == "hello>"
    assert tokenizer.decode(tokenizer("zebra", add_special_tokens=False)["input_ids"]) == "zebra"
    cfg = transformers.AutoConfig.from_pretrained(str(demo_model_dir()))
    assert cfg.eos_token_id == tokenizer.eos_token_id
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads


def test_expected_output() -> None:
    assert expected_output("copy", "hello") == "hello"
    assert expected_output("reverse", "hello") == "olleh"
    assert expected_output("sort", "banana") == "aaabnn"
    assert expected_output("rot13", "hello") == "uryyb"
    assert expected_output("dedupe", "banana") == "ban"
    with pytest.raises(KeyError):
        expected_output("shout", "hello")
    with pytest.raises(ValueError):
        expected_output("copy", "Hello")


def test_base_copies_held_out_words(peft_model, tokenizer) -> None:
    words = held_out_words()
    with peft_model.disable_adapter():
        outputs = _generate(peft_model, tokenizer, words)
    assert _accuracy(BASE_TASK, words, outputs) >= MIN_ACCURACY


def test_adapters_do_their_tasks(peft_model, tokenizer) -> None:
    words = held_out_words()
    outputs: dict[str, list[str]] = {}
    for name in demo_adapters():
        peft_model.set_adapter(name)
        outputs[name] = _generate(peft_model, tokenizer, words)
        acc = _accuracy(name, words, outputs[name])
        assert acc >= MIN_ACCURACY, f"{name}: {acc:.1%}"
    # Same input, different adapter, different answer: the demo's whole point.
    names = sorted(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            differ = sum(x != y for x, y in zip(outputs[a], outputs[b], strict=True))
            assert differ >= len(words) // 2, f"{a} and {b} answer alike"
