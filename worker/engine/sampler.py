"""Per-request sampling over one batch of logits: logit processors (allowed tokens, logit
bias, ``min_tokens``, penalties), then greedy or temperature / min-p / top-k / top-p, with
optional log-probabilities.

Sampling is split so the engine never waits on the device before it has queued the next
step: ``plan`` uploads the batch's parameters before the forward pass, ``sample`` queues
the draw (and the copy of its result to the host) on the device, and
``SampledTokens.tolist`` is the one wait, for that step only.

The order is vLLM's: allowed tokens, logit bias and ``min_tokens`` bans, then the
repetition / presence / frequency penalties, then (sampling rows) temperature, min-p, top-k
and top-p. Log-probabilities are of the raw logits, before any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafleet.kernels.transfer import int_tensor, to_device
from lorafleet.worker.engine.sequence import Sequence

#: Rows of ``SamplingPlan.params``.
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _GREEDY = range(5)


@dataclass
class Penalties:
    """Penalties of the rows ``rows`` (int64 [P]): ``factors`` float32 [3, P] (repetition,
    presence, frequency); ``seen`` bool [P, vocab] marks tokens of the prompt or output
    (repetition), ``counts`` float32 [P, vocab] counts output tokens (presence, frequency)."""

    rows: torch.Tensor
    factors: torch.Tensor
    seen: torch.Tensor
    counts: torch.Tensor


@dataclass
class SamplingPlan:
    """One step's sampling parameters, on the device.

    ``params`` is float32 [5, N]: temperature, top-k (+inf when off), top-p, min-p, greedy
    flag; None when every row is greedy. ``banned`` is the (rows, token ids) index of EOS
    and stop tokens that rows below ``min_tokens`` may not pick. ``bias`` adds values
    float32 [B] at (rows, token ids); ``allowed`` is (rows [R], mask float32 [R, vocab] of 0
    for allowed tokens and -inf for the rest). ``seeded`` lists the rows that draw from
    their request's own generator (on the host, reproducible across batches).
    ``logprob_rows`` (host) lists the rows that report log-probabilities and ``top_logprobs``
    how many top tokens the widest of them wants."""

    params: torch.Tensor | None = None
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None
    penalties: Penalties | None = None
    seeded: tuple[tuple[int, torch.Generator], ...] = ()
    logprob_rows: list[int] = field(default_factory=list)
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and rank (1 = most likely), and the ``top``
    (token id, log-probability) pairs, most likely first."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]


class SampledTokens:
    """Token ids queued on the device (``tokens``, int64 [N]); ``tolist`` waits for them.

    On CUDA a copy to pinned host memory is queued right behind the draw, with an event:
    ``tolist`` waits for that event only, not for whatever was queued on the stream since
    (a plain ``tokens.tolist()`` would wait for the next step too). Seeded rows are drawn
    on the host from ``probs`` (float32 [N, vocab]) with their requests' generators.
    ``raw_logprobs`` (float32 [L, vocab]) are the log-softmax of the raw logits of
    ``logprob_rows``; ``logprobs()`` reads them after ``tolist``."""

    def __init__(
        self,
        tokens: torch.Tensor,
        probs: torch.Tensor | None = None,
        seeded: tuple[tuple[int, torch.Generator], ...] = (),
        raw_logprobs: torch.Tensor | None = None,
        logprob_rows: list[int] | None = None,
        top_logprobs: int = 0,
    ) -> None:
        self.tokens, self.probs, self.seeded = tokens, probs, seeded
        self.raw_logprobs, self.logprob_rows = raw_logprobs, logprob_rows or []
        self.top_logprobs = top_logprobs
        self._host, self._ready = tokens, None
        self._list: list[int] | None = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def tolist(self) -> list[int]:
        if self._list is None:
            if self._ready is not None:
                self._ready.synchronize()
            out = self._host.tolist()
            for i, generator in self.seeded:
                out[i] = int(torch.multinomial(self.probs[i].cpu(), 1, generator=generator))
            self._list = out
        return self._list

    def logprobs(self) -> dict[int, TokenLogprobs]:
        """Row -> the sampled token's log-probability, rank and top tokens, for the rows
        that asked (after ``tolist``: seeded rows are drawn on the host)."""
        if self.raw_logprobs is None:
            return {}
        tokens = self.tolist()
        lp = self.raw_logprobs
        picked = to_device(int_tensor([tokens[r] for r in self.logprob_rows]), lp.device)
        chosen = lp.gather(1, picked[:, None])  # [L, 1]
        ranks = (lp > chosen).sum(dim=1) + 1
        top_values, top_ids = lp.topk(self.top_logprobs, dim=1)
        rows = zip(
            self.logprob_rows,
            chosen[:, 0].tolist(),
            ranks.tolist(),
            top_ids.tolist(),
            top_values.tolist(),
            strict=True,
        )
        return {
            row: TokenLogprobs(value, rank, list(zip(ids, values, strict=True)))
            for row, value, rank, ids, values in rows
        }


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int, vocab_size: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        self.seed = seed

    def plan(self, seqs: list[Sequence], device: torch.device) -> SamplingPlan:
        """Upload ``seqs``' parameters (one row each, in order) to ``device``.

        Penalized rows need every token of their sequence on the host (the engine reads a
        step with such rows back before planning the next)."""
        plan = SamplingPlan(
            banned=self._banned(seqs, device),
            bias=self._bias(seqs, device),
            allowed=self._allowed(seqs, device),
            penalties=self._penalties(seqs, device),
        )
        wanted = [
            (i, s.params.logprobs) for i, s in enumerate(seqs) if s.params.logprobs is not None
        ]
        plan.logprob_rows = [i for i, _ in wanted]
        plan.top_logprobs = max((k for _, k in wanted), default=0)
        if all(s.params.greedy for s in seqs):
            return plan
        table = [
            (
                1.0 if s.params.greedy else s.params.temperature,
                float(s.params.top_k) if s.params.top_k > 0 else float("inf"),
                s.params.top_p,
                s.params.min_p,
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

    def _banned(
        self, seqs: list[Sequence], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = (*self.eos_token_ids, *(seq.params.stop_token_ids or ()))
                rows += [i] * len(banned)
                cols += banned
        if not rows:
            return None
        index = to_device(int_tensor([*rows, *cols]), device)
        return index[: len(rows)], index[len(rows) :]

    def _bias(
        self, seqs: list[Sequence], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows, cols, values = [], [], []
        for i, seq in enumerate(seqs):
            for token, value in (seq.params.logit_bias or {}).items():
                rows.append(i)
                cols.append(token)
                values.append(value)
        if not rows:
            return None
        index = to_device(int_tensor([*rows, *cols]), device)
        return index[: len(rows)], index[len(rows) :], to_device(torch.tensor(values), device)

    def _allowed(
        self, seqs: list[Sequence], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        limited = [(i, s.params.allowed_token_ids) for i, s in enumerate(seqs)]
        limited = [(i, ids) for i, ids in limited if ids is not None]
        if not limited:
            return None
        mask = torch.full((len(limited), self.vocab_size), float("-inf"))
        for k, (_, ids) in enumerate(limited):
            mask[k, ids] = 0.0
        rows = to_device(int_tensor([i for i, _ in limited]), device)
        return rows, to_device(mask, device)

    def _penalties(self, seqs: list[Sequence], device: torch.device) -> Penalties | None:
        penalized = [(i, s) for i, s in enumerate(seqs) if s.params.penalized]
        if not penalized:
            return None
        vocab = self.vocab_size
        seen = torch.zeros(len(penalized), vocab, dtype=torch.bool)
        counts = torch.zeros(len(penalized), vocab)
        for k, (_, seq) in enumerate(penalized):
            output = seq.output_token_ids
            if output and min(output) < 0:
                raise RuntimeError("penalties need every output token on the host")
            seen[k, seq.token_ids[: seq.num_prompt_tokens]] = True
            counts[k].index_add_(0, int_tensor(output), torch.ones(len(output)))
        seen |= counts > 0
        factors = [
            (s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty)
            for _, s in penalized
        ]
        return Penalties(
            rows=to_device(int_tensor([i for i, _ in penalized]), device),
            factors=to_device(torch.tensor(factors, dtype=torch.float32).T.contiguous(), device),
            seen=to_device(seen, device),
            counts=to_device(counts, device),
        )

    def sample(self, logits: torch.Tensor, plan: SamplingPlan) -> SampledTokens:
        """logits float32 [N, vocab] (modified in place) -> one token per row, queued."""
        raw_logprobs = None
        if plan.logprob_rows:
            rows = to_device(int_tensor(plan.logprob_rows), logits.device)
            raw_logprobs = logits.index_select(0, rows).log_softmax(dim=-1)
        process_logits(logits, plan)
        extras = dict(
            raw_logprobs=raw_logprobs,
            logprob_rows=plan.logprob_rows,
            top_logprobs=plan.top_logprobs,
        )
        greedy = logits.argmax(dim=-1)
        if plan.params is None:
            return SampledTokens(greedy, **extras)
        params = plan.params
        probs = filtered_probs(
            logits, params[_TEMPERATURE], params[_MIN_P], params[_TOP_K], params[_TOP_P]
        )
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        sampled = (probs / noise).argmax(dim=-1)  # Gumbel-style draw from ``probs``
        tokens = torch.where(params[_GREEDY].bool(), greedy, sampled)
        return SampledTokens(tokens, probs if plan.seeded else None, plan.seeded, **extras)


def process_logits(logits: torch.Tensor, plan: SamplingPlan) -> None:
    """The logit processors, in place on float32 [N, vocab]: allowed tokens, logit bias,
    ``min_tokens`` bans, then repetition / presence / frequency penalties."""
    if plan.allowed is not None:
        rows, mask = plan.allowed
        logits.index_add_(0, rows, mask)
    if plan.bias is not None:
        rows, cols, values = plan.bias
        logits.index_put_((rows, cols), values, accumulate=True)
    if plan.banned is not None:
        logits.index_put_(plan.banned, logits.new_full((), float("-inf")))
    p = plan.penalties
    if p is not None:
        part = logits.index_select(0, p.rows)
        repetition, presence, frequency = p.factors[:, :, None]
        penalized = torch.where(part > 0, part / repetition, part * repetition)
        part = torch.where(p.seen, penalized, part)
        part -= presence * (p.counts > 0) + frequency * p.counts
        logits.index_copy_(0, p.rows, part)


def filtered_probs(
    logits: torch.Tensor,
    temps: torch.Tensor,
    min_p: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Softmax of logits / temperature after min-p, top-k and top-p filtering, per row.

    The parameters are float32 [N]; top-k is +inf where it is off. Top-p keeps the most
    likely tokens whose mass, renormalized after min-p and top-k, first reaches ``top_p``
    (the token that crosses it included), as vLLM's and Hugging Face's warpers do."""
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    # p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p), independent of the rest.
    drop |= sorted_logits - sorted_logits[:, :1] < min_p[:, None].log()
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return filtered.softmax(dim=-1)
