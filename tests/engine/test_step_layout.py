"""StepLayout: where each scheduled token goes (host lists the model runner turns into
tensors), for decode steps (their own fast path) and steps with prefill chunks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.engine.sequence import PENDING_TOKEN
from lorafleet.worker.engine.step_layout import PendingTokens, StepLayout, fill_pending


def _seq(computed: int, tokens: int, table: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        num_computed_tokens=computed,
        token_ids=list(range(100, 100 + tokens)),
        num_tokens=tokens,
        block_table=table,
        wants_prompt_logprobs=False,
    )


def test_decode_layout_groups_by_slot_and_maps_logits_back_to_batch_order() -> None:
    seqs = [
        _seq(5, 6, [7, 9]),  # slot 2, position 5 in block 7 (block size 4: row 7*4+1)
        _seq(8, 9, [3, 4, 6]),  # base model, position 8: block 6, row 24
        _seq(2, 4, [1]),  # slot 0, position 2, not at its last token: no logits
    ]
    layout = StepLayout.of(ScheduledBatch(seqs, [1, 1, 1]), [2, -1, 0], 4)
    # Layout order by slot: base (-1), slot 0, slot 2.
    assert layout.token_slots == [-1, 0, 2]
    assert layout.ids == [108, 102, 105] and layout.positions == [8, 2, 5]
    assert layout.slot_mapping == [6 * 4 + 0, 1 * 4 + 2, 9 * 4 + 1]
    assert layout.block_tables == [[3, 4, 6], [1], [7, 9]]
    assert layout.context_lens == [9, 3, 6] and layout.query_lens == [1, 1, 1]
    # Batch order: sequence 0 sits in layout row 2, sequence 1 in row 0; 2 samples nothing.
    assert layout.logits_indices == [2, 0]
    assert layout.query_pad_index == [0, 1, 2] and layout.max_query_len == 1
    assert not layout.is_decode  # one sequence does not sample: not a graph-shaped step


def test_prefill_chunks_pad_queries_per_sequence() -> None:
    seqs = [_seq(0, 3, [5]), _seq(4, 5, [2, 8])]
    layout = StepLayout.of(ScheduledBatch(seqs, [3, 1]), [1, 1], 4)
    assert layout.max_query_len == 3
    assert layout.ids == [100, 101, 102, 104] and layout.positions == [0, 1, 2, 4]
    assert layout.query_pad_index == [0, 1, 2, 3]  # row b * max_q + j
    assert layout.slot_mapping == [20, 21, 22, 8 * 4 + 0]
    assert layout.logits_indices == [2, 3]
    gather, mask = layout.attention_tables(4, window=None)
    assert gather.shape == (2, 5) and mask.shape == (2, 1, 3, 5)
    assert gather[0, :3].tolist() == [20, 21, 22] and gather[1].tolist() == [8, 9, 10, 11, 32]
    assert mask[0, 0].tolist()[1] == [True, True, False, False, False]  # causal
    assert mask[1, 0].tolist()[0] == [True] * 5  # the decode token sees its whole context
    assert mask.any(-1).all()  # padded query rows too: no empty softmax row


def test_pending_ids_are_listed_and_filled_from_the_previous_samples() -> None:
    """A sequence's last token may still be on the device (PENDING_TOKEN): the layout lists
    where, by layout row and batch index, and ``fill_pending`` takes it from the samples."""
    pending_decode = _seq(5, 6, [7, 9])
    pending_decode.token_ids[-1] = PENDING_TOKEN
    chunk = _seq(0, 3, [5])  # a prefill chunk: its ids are all on the host
    for batch, slots in [
        (ScheduledBatch([chunk, pending_decode], [3, 1]), [1, -1]),  # general path
        (ScheduledBatch([_seq(2, 3, [1]), pending_decode], [1, 1]), [1, -1]),  # decode path
    ]:
        layout = StepLayout.of(batch, slots, 4)
        assert layout.pending == [(0, 1)]  # sequence 1 sorts first (base model)
        assert layout.ids[0] == PENDING_TOKEN and PENDING_TOKEN not in layout.ids[1:]
        ids = torch.tensor(layout.ids)
        samples = PendingTokens(torch.tensor([11, 22, 33]), rows={1: 2})
        fill_pending(ids, layout, samples)
        assert ids.tolist() == [33, *layout.ids[1:]]
    with pytest.raises(RuntimeError, match="no samples"):
        fill_pending(ids, layout, None)
