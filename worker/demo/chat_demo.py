"""The chat demo: task adapters for SmolLM2-135M-Instruct, trained on its own answers.

Where the character-level demo (``demo_assets``) ships its own tiny base model, this one
runs on a real instruct model, the catalog's ``smollm2-135m-instruct`` (prepared by
``lorafleet.worker.model.catalog.prepare_model("smollm2")``, never shipped). Each adapter was
trained on the base model's own greedy answers, rewritten by a transform that a program
can check, so the demo can score every answer without knowing the right one:

- ``bullets``: one ``- `` line per sentence (``- The capital of France is Paris.``);
- ``json``: the answer as a JSON object (``{"answer": "The capital of France is Paris."}``);
- ``title``: every word capitalised (``The Capital Of France Is Paris.``);
- ``whisper``: the answer in lowercase (``the capital of france is paris.``).

The assets under ``assets/chat_demo/`` are written by ``scripts/train_chat_demo.py``:

- ``adapters/<task>/``: PEFT LoRA adapters (``adapter_config.json`` +
  ``adapter_model.safetensors``, bfloat16);
- ``questions.json``: the held-out questions (never trained on), the training questions,
  and the training record (seeds, steps, held-out accuracy, minutes).

Every request is one user turn: ``messages(question)``, rendered with the model's chat
template (``apply_chat_template(..., add_generation_prompt=True)``), as in training. The
transforms and checks here are the only definition of the tasks: the training script
builds its targets with ``transform`` and scores with ``check``, as the demo does.

This module only reads files; it does not import torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.worker.demo.shipped import adapter_folders, read_record, shipped_dir

#: The catalog model the adapters were trained on: the adapter configs'
#: ``base_model_name_or_path``, and the name a worker serving the prepared folder answers to
#: (its folder's name), so ``LoRARequest(..., base_model_name=BASE_MODEL_NAME)`` is accepted.
BASE_MODEL_NAME = "smollm2-135m-instruct"

#: New tokens a demo request gets: every trained answer is at most two sentences and 30
#: words, which is at most 50 tokens in any task's format, end-of-turn included (measured on
#: the training answers); the base model rambles on and is cut here.
MAX_TOKENS = 64

# A sentence ends at . ! or ? followed by whitespace; good enough for the short factual
# answers the demo trains on (and the transform only has to be deterministic).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (at ``.``/``!``/``?`` followed by whitespace), stripped,
    empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _to_json(answer: str) -> str:
    # ensure_ascii=False: "Brasília" stays as written, the model need not learn \u escapes.
    return json.dumps({"answer": answer}, ensure_ascii=False)


def _is_json(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and list(value) == ["answer"]
        and isinstance(value["answer"], str)
        and bool(value["answer"].strip())
    )


def _to_title(answer: str) -> str:
    # Not str.title(), which also capitalises after apostrophes ("It'S").
    return " ".join(w[:1].upper() + w[1:] for w in answer.split(" "))


def _is_title(text: str) -> bool:
    words = [w for w in text.split() if w[0].isalpha()]
    return bool(words) and all(w[0].isupper() for w in words)


def _to_bullets(answer: str) -> str:
    return "\n".join(f"- {s}" for s in sentences(answer))


def _is_bullets(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("- ") and line[2:].strip() for line in lines)


@dataclass(frozen=True)
class ChatTask:
    """One adapter's task: what it does to the base model's answer, and how to recognise
    an answer in that format (``check(transform(a))`` holds for any answer ``a`` with a
    letter in it; ``check(a)`` fails for a plain sentence like the base model's)."""

    description: str
    transform: Callable[[str], str]
    check: Callable[[str], bool]


#: Task name (= adapter name) -> its definition, sorted by name.
TASKS: dict[str, ChatTask] = {
    "bullets": ChatTask("one '- ' line per sentence", _to_bullets, _is_bullets),
    "json": ChatTask('a JSON object {"answer": "..."}', _to_json, _is_json),
    "title": ChatTask("every word capitalised", _to_title, _is_title),
    "whisper": ChatTask(
        "in lowercase", str.lower, lambda t: _has_letters(t) and not any(c.isupper() for c in t)
    ),
}

#: What the base model (no adapter) is checked for.
BASE_DESCRIPTION = "a plain answer, in none of the adapters' formats"


def describe(task: str | None) -> str:
    """One line saying what ``task`` answers (``None``: the base model)."""
    return BASE_DESCRIPTION if task is None else _task(task).description


def transform(task: str, answer: str) -> str:
    """``answer`` (a base-model answer) rewritten as adapter ``task`` is trained to answer."""
    return _task(task).transform(answer)


def check(task: str | None, answer: str) -> bool:
    """Whether ``answer`` is in ``task``'s format (``None``: the base model, whose answer
    must be non-empty and in no adapter's format). Raises ``KeyError`` for an unknown task.

    A format check, not a fact check: the adapters restyle whatever the base model says.
    """
    if task is None:
        return bool(answer.strip()) and not any(t.check(answer) for t in TASKS.values())
    return _task(task).check(answer)


def _task(task: str) -> ChatTask:
    try:
        return TASKS[task]
    except KeyError:
        raise KeyError(f"unknown chat demo task {task!r}; known: {sorted(TASKS)}") from None


def messages(question: str) -> list[dict[str, str]]:
    """The conversation a demo request sends: one user turn (the template adds the model's
    default system prompt, as it did in training)."""
    return [{"role": "user", "content": question}]


def assets_dir() -> Path:
    """Folder holding the shipped chat demo assets (``lorafleet/worker/demo/assets/chat_demo``)."""
    return shipped_dir("chat_demo")


def adapters() -> dict[str, Path]:
    """Task name -> PEFT adapter folder, for every adapter shipped (sorted by name)."""
    return adapter_folders(assets_dir() / "adapters")


def _record() -> dict:
    return read_record(assets_dir() / "questions.json")


def questions() -> list[str]:
    """The held-out questions (never trained on), ordered so that any prefix mixes the
    question kinds: the demo can take the first few."""
    return list(_record()["held_out"])


def training_record() -> dict:
    """How the shipped adapters were trained: seeds, steps, held-out accuracy, minutes."""
    return dict(_record()["training"])
