"""Float64 references for sampling rules that transformers has no processor for."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


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
