"""Per-request sampling over one batch of logits (greedy, temperature, top-k, top-p, seed).

Sampling is split so the engine never waits on the device before it has queued the next
step: ``plan`` uploads the batch's parameters before the forward pass, ``sample`` queues
the draw (and the copy of its result to the host) on the device, and
``SampledTokens.tolist`` is the one wait, for that step only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.kernels.meta import to_device
from lorafleet.worker.sequence import Sequence


@dataclass
class SamplingPlan:
    """One step's sampling parameters, on the device.

    ``params`` is float32 [4, N]: temperature, top-k (+inf when off), top-p, greedy flag;
    None when every row is greedy. ``banned`` is the (rows, token ids) index of EOS and
    stop tokens that rows below ``min_tokens`` may not pick. ``seeded`` lists the rows that
    draw from their request's own generator (on the host, reproducible across batches)."""

    params: torch.Tensor | None = None
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    seeded: tuple[tuple[int, torch.Generator], ...] = ()


class SampledTokens:
    """Token ids queued on the device (``tokens``, int64 [N]); ``tolist`` waits for them.

    On CUDA a copy to pinned host memory is queued right behind the draw, with an event:
    ``tolist`` waits for that event only, not for whatever was queued on the stream since
    (a plain ``tokens.tolist()`` would wait for the next step too). Seeded rows are drawn
    on the host from ``probs`` (float32 [N, vocab]) with their requests' generators."""

    def __init__(
        self,
        tokens: torch.Tensor,
        probs: torch.Tensor | None = None,
        seeded: tuple[tuple[int, torch.Generator], ...] = (),
    ) -> None:
        self.tokens, self.probs, self.seeded = tokens, probs, seeded
        self._host, self._ready = tokens, None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def tolist(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        out = self._host.tolist()
        for i, generator in self.seeded:
            out[i] = int(torch.multinomial(self.probs[i].cpu(), 1, generator=generator))
        return out


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator: torch.Generator | None = None
        self.seed = seed

    def plan(self, seqs: list[Sequence], device: torch.device) -> SamplingPlan:
        """Upload ``seqs``' parameters (one row each, in order) to ``device``."""
        plan = SamplingPlan()
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = (*self.eos_token_ids, *(seq.params.stop_token_ids or ()))
                rows += [i] * len(banned)
                cols += banned
        if rows:
            index = to_device(torch.tensor([rows, cols]), device)
            plan.banned = (index[0], index[1])
        if all(s.params.greedy for s in seqs):
            return plan
        table = [
            (
                1.0 if s.params.greedy else s.params.temperature,
                float(s.params.top_k) if s.params.top_k > 0 else float("inf"),
                s.params.top_p,
                float(s.params.greedy),
            )
            for s in seqs
        ]
        plan.params = to_device(torch.tensor(table, dtype=torch.float32).T.contiguous(), device)
        plan.seeded = tuple(
            (i, s.generator)
            for i, s in enumerate(seqs)
            if s.generator is not None and not s.params.greedy
        )
        return plan

    def sample(self, logits: torch.Tensor, plan: SamplingPlan) -> SampledTokens:
        """logits float32 [N, vocab] (modified in place) -> one token per row, queued."""
        if plan.banned is not None:
            logits.index_put_(plan.banned, logits.new_full((), float("-inf")))
        greedy = logits.argmax(dim=-1)
        if plan.params is None:
            return SampledTokens(greedy)
        temps, top_k, top_p, is_greedy = plan.params
        probs = _filtered_probs(logits, temps, top_k, top_p)
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        sampled = (probs / noise).argmax(dim=-1)  # Gumbel-style draw from ``probs``
        tokens = torch.where(is_greedy.bool(), greedy, sampled)
        return SampledTokens(tokens, probs if plan.seeded else None, plan.seeded)


def _filtered_probs(
    logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Softmax of logits / temperature after top-k and top-p filtering, per row. The
    parameters are float32 [N]; top-k is +inf where it is off."""
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_probs = sorted_logits.softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return filtered.softmax(dim=-1)
