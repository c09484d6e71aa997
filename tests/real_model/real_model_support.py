"""What the real-model tests share: the adapters they make, the questions they ask, and how
a chat request's prompt ids are formed."""

from __future__ import annotations

#: Adapters on the real model: (name, rank, targets). Different ranks and target sets, more
#: of them than the tests' ``max_loras``, so slots evict.
REAL_ADAPTERS = (
    ("qv8", 8, ("q_proj", "v_proj")),
    ("all16", 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("attn4", 4, ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp32", 32, ("gate_proj", "up_proj", "down_proj")),
)

#: Chat prompts for the comparisons (short answers keep the PEFT reference quick).
QUESTIONS = (
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "Say hello in Spanish.",
    "What colour is the sky on a clear day?",
)


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The ids a chat request for ``question`` runs on: the template's rendering, tokenized
    without adding special tokens (the template writes its own)."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
