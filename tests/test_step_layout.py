"""StepLayout: where each scheduled token goes (host lists the model runner turns into
tensors), for decode steps (their own fast path) and steps with prefill chunks."""

from __future__ import annotations

from types import SimpleNamespace

from lorafleet.worker.scheduler import ScheduledBatch
from lorafleet.worker.step_layout import StepLayout


def _seq(computed: int, tokens: int, table: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        num_computed_tokens=computed,
        token_ids=list(range(100, 100 + tokens)),
        num_tokens=tokens,
        block_table=table,
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
