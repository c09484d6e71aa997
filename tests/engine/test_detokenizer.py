"""Incremental detokenization: streamed text equals a full decode, whatever the tokens."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from lorafleet.worker.engine.detokenizer import Detokenizer, TokenDecoder


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.mark.parametrize("seed", range(5))
def test_deltas_concatenate_to_the_full_decode(tokenizer, seed: int) -> None:
    """Random ids over the byte vocabulary split multi-byte UTF-8 characters across tokens
    (held back until complete) and repeat single tokens (served from the shared cache)."""
    rng = random.Random(seed)
    decoder = TokenDecoder(tokenizer)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(200)]
    ids += [ids[0]] * 5  # the same single-token window again and again
    detok = Detokenizer(decoder)
    streamed = []
    for token in ids:
        assert detok.append(token) is None  # no stop strings
        streamed.append(detok.delta(final=False))
    detok.flush()
    streamed.append(detok.delta(final=True))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(streamed) == detok.text == full


def test_single_token_texts_are_cached_per_decoder(tokenizer) -> None:
    decoder = TokenDecoder(tokenizer)
    token = tokenizer.encode("a", add_special_tokens=False)[0]
    assert decoder([token]) == tokenizer.decode([token], skip_special_tokens=True)
    assert decoder([token]) is decoder([token])  # the cached string object
    assert decoder([]) == ""
