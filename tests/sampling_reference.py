"""References for the engine's sampling: Hugging Face's greedy continuation, and float64
rules that transformers has no processor for."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def greedy_continuation(model, ids: torch.Tensor, max_new_tokens: int, **options) -> list[int]:
    """The new token ids of ``model.generate``'s greedy continuation of the one prompt
    ``ids`` [1, P]; ``options`` go to ``generate`` as given (``min_new_tokens``, ...)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, **options
        )
    return out[0, ids.shape[1] :].tolist()


class OpenAIPenalties(LogitsProcessor):
    """Presence and frequency penalties over the generated tokens, in float64 (OpenAI's
    rule): no transformers processor exists for them."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.double()
        for row, ids in enumerate(input_ids):
            counts = torch.bincount(ids[self.prompt_len :], minlength=scores.shape[-1])
            out[row] -= self.frequency * counts.double() + self.presence * (counts > 0).double()
        return out.to(scores.dtype)
