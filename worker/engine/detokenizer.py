"""Incremental detokenization with stop strings.

Decoding the whole output every step is quadratic; instead decode a short window around
the newest tokens and emit the text that became stable (a window ending in U+FFFD is an
incomplete UTF-8 sequence and waits for the next token). Text that could still turn into a
stop string is held back, so streamed deltas always concatenate to the final text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


class TokenDecoder:
    """Decodes token-id windows for every sequence of one engine.

    In steady state each new token is emitted at once, and the next step's prefix window is
    that one token alone: single-token texts come from a cache (one per vocabulary entry at
    most), so a token costs one decode instead of two.
    """

    def __init__(self, tokenizer: object, skip_special_tokens: bool = True) -> None:
        # The Rust tokenizer decodes the same text several times faster than transformers'
        # wrapper, which only adds work when it cleans up tokenization spaces.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        skip = skip_special_tokens
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = functools.partial(backend.decode, skip_special_tokens=skip)
        else:
            self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip)
        self._single: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> str:
        if len(ids) != 1:
            return self._decode(ids) if ids else ""
        text = self._single.get(ids[0])
        if text is None:
            text = self._single[ids[0]] = self._decode(ids)
        return text


@dataclass
class Detokenizer:
    """Turns appended token ids into text deltas for one sequence."""

    decode: TokenDecoder
    stop: tuple[str, ...] = ()
    text: str = ""
    emitted: int = 0  # chars of ``text`` already handed out as deltas
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _stop_at: int = 0
    _stop_end: int = 0

    def __post_init__(self) -> None:
        # Runs once per generated token: keep the stop-string window's length at hand.
        self._stop_window = max((len(s) for s in self.stop), default=0)

    def append(self, token_id: int) -> str | None:
        """Add a token; return the stop string the new text completes, if any (the caller
        decides whether to stop; ``cut_at_stop`` then drops it and what follows)."""
        self._ids.append(token_id)
        prefix = self.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        new = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        start = max(0, len(self.text) - self._stop_window)
        self.text += new
        if not self.stop:
            return None
        hits = [(at, s) for s in self.stop if (at := self.text.find(s, start)) != -1]
        if not hits:
            return None
        self._stop_at, matched = min(hits)
        self._stop_end = self._stop_at + len(matched)
        return matched

    def cut_at_stop(self, keep_stop: bool = False) -> None:
        """Drop the matched stop string (kept when ``keep_stop``) and what follows it."""
        self.text = self.text[: self._stop_end if keep_stop else self._stop_at]

    def flush(self) -> None:
        """At the end of a sequence, add text still pending (e.g. a trailing incomplete
        UTF-8 sequence, which then decodes to U+FFFD as a full decode would)."""
        prefix = self.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)

    def delta(self, final: bool) -> str:
        """Text not yet emitted that can no longer become part of a stop string."""
        hold = 0 if final or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
