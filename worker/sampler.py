"""Per-request sampling over one batch of logits (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

import torch

from lorafleet.worker.sequence import Sequence


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator: torch.Generator | None = None
        self.seed = seed

    def _suppress_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Below ``min_tokens``, EOS and stop tokens cannot be picked."""
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = list(self.eos_token_ids) + list(seq.params.stop_token_ids or ())
                logits[i, banned] = float("-inf")

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits float32 [N, vocab] (modified in place) -> one token id per sequence."""
        self._suppress_stops(logits, seqs)
        greedy = logits.argmax(dim=-1)
        if all(s.params.greedy for s in seqs):
            return greedy.tolist()
        probs = self._filtered_probs(logits, seqs)
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        sampled = (probs / noise).argmax(dim=-1)  # Gumbel-style draw from ``probs``
        out = torch.where(
            torch.tensor([s.params.greedy for s in seqs], device=logits.device), greedy, sampled
        )
        tokens = out.tolist()
        for i, seq in enumerate(seqs):
            if seq.generator is not None and not seq.params.greedy:
                row = probs[i].float().cpu()
                tokens[i] = int(torch.multinomial(row, 1, generator=seq.generator))
        return tokens

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Softmax of logits / temperature after top-k and top-p filtering, per row."""
        device = logits.device
        temps = torch.tensor(
            [s.params.temperature if not s.params.greedy else 1.0 for s in seqs], device=device
        )
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_k = torch.tensor(
            [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device=device
        )
        top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop |= before >= top_p[:, None]
        drop[:, 0] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        return filtered.softmax(dim=-1)
