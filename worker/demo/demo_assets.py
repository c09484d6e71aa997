"""The shipped demo: a tiny trained character-level base model and task adapters.

``lorafleet demo`` needs a model whose outputs can be checked by eye, so that a newcomer
sees that each request really got its own adapter. The assets under ``assets/demo/`` are
produced by ``scripts/train_demo.py`` (fixed seeds, CPU, a few minutes) and ship as package
data, so the demo needs no training and no download:

- ``base/``: a ``LlamaForCausalLM`` (hidden 128, 3 layers, 4 heads, 2 KV heads) with a
  character-level tokenizer. Given the prompt ``demo_prompt(word)`` (``"hello>"``) it
  copies the word and stops with EOS: task ``"copy"``.
- ``adapters/<task>/``: PEFT LoRA adapters (``adapter_config.json`` +
  ``adapter_model.safetensors``) that change the same prompt's answer to another task
  (``"reverse"``, ``"sort"`` its letters, ``"rot13"``, ``"dedupe"``: keep each letter's
  first occurrence only, ``"banana"`` -> ``"ban"``).
- ``words.json``: the held-out words (real English words, never seen in training) and how
  the training words were sampled.

Every task maps lowercase ``a``-``z`` words to lowercase words: measured on a base like
this one, LoRA could not learn to emit tokens the base never emits, so no task may need a
new output token.

This module only reads files; it does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lorafleet.producer.types import LoRARequest
from lorafleet.worker.demo.shipped import adapter_folders, lora_requests, read_record, shipped_dir

#: Separates the word from the answer in a prompt; the answer follows it directly.
PROMPT_SUFFIX = ">"

#: Name under which the base model is referred to (adapter configs' ``base_model_name_or_path``).
BASE_MODEL_NAME = "lorafleet-demo"

#: The base model's own task (no adapter).
BASE_TASK = "copy"

#: Word lengths the models were trained on; longer words come out wrong (``"lorafleet"``
#: copies as ``"loraflet"``), so pick demo words inside this range.
MIN_WORD_LEN, MAX_WORD_LEN = 3, 8

#: The only characters a demo word may contain (and the only ones any task outputs).
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_ROT13 = str.maketrans(ALPHABET, ALPHABET[13:] + ALPHABET[:13])


def _dedupe(word: str) -> str:
    """Keep the first occurrence of each letter: ``"banana"`` -> ``"ban"``."""
    # dict preserves insertion order, so this keeps first occurrences in order.
    return "".join(dict.fromkeys(word))


#: Task name -> the function the model (base or adapter) was trained to compute.
TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "rot13": lambda w: w.translate(_ROT13),
    "dedupe": _dedupe,
}


def assets_dir() -> Path:
    """Folder holding the shipped demo assets (``lorafleet/worker/demo/assets/demo``)."""
    return shipped_dir("demo")


def demo_model_dir() -> Path:
    """Hugging Face folder of the demo base model (config, safetensors, tokenizer)."""
    return assets_dir() / "base"


def demo_adapters() -> dict[str, Path]:
    """Task name -> PEFT adapter folder, for every adapter shipped (sorted by name)."""
    return adapter_folders(assets_dir() / "adapters")


def demo_lora_requests(base_model_name: str | None = None) -> dict[str, LoRARequest]:
    """Task name -> request for each shipped adapter, ids 1, 2, ... in name order."""
    return lora_requests(demo_adapters(), base_model_name)


def _words() -> dict:
    return read_record(assets_dir() / "words.json")


def held_out_words() -> list[str]:
    """Words kept out of every training run: use these to measure accuracy."""
    return list(_words()["held_out"])


def demo_prompt(word: str) -> str:
    """The prompt for ``word``: the word followed by ``>`` (``"hello"`` -> ``"hello>"``).

    The tokenizer prepends BOS itself; the expected completion is
    ``expected_output(task, word)`` followed by EOS.
    """
    return word + PROMPT_SUFFIX


def expected_output(task: str, word: str) -> str:
    """What ``task`` (``"copy"`` for the base model, else an adapter's name) answers for ``word``.

    Raises ``KeyError`` for an unknown task and ``ValueError`` for a word outside the
    trained alphabet (lowercase ``a``-``z``), for which no answer was ever trained. Length
    is not checked: the function is right for any length, the models only for
    ``MIN_WORD_LEN``..``MAX_WORD_LEN`` letters.
    """
    if task not in TASKS:
        raise KeyError(f"unknown demo task {task!r}; known: {sorted(TASKS)}")
    if not word or word.strip(ALPHABET):
        raise ValueError(f"demo words are non-empty lowercase a-z, got {word!r}")
    return TASKS[task](word)
