"""Tests for batch planning by prompt length."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skipkv_cli.grouping import PlannedBatch, plan_batches

lengths_strategy = st.lists(st.integers(min_value=1, max_value=64), max_size=40)
batch_size_strategy = st.integers(min_value=1, max_value=9)


def total_padding(batches: list[PlannedBatch]) -> int:
    return sum(sum(batch.padding) for batch in batches)


def test_hand_example_grouped():
    lengths = [10, 3, 7, 3, 12]

    batches = plan_batches(lengths, batch_size=2)

    # Sorted: 3, 3, 7, 10, 12. The short batch goes where it saves the most
    # padding: [3, 3] [7] [10, 12] pads 2 tokens, [3, 3] [7, 10] [12] pads 3.
    assert [batch.index for batch in batches] == [0, 1, 2]
    assert [batch.members for batch in batches] == [[1, 3], [2], [0, 4]]
    assert [batch.lengths for batch in batches] == [[3, 3], [7], [10, 12]]
    assert [batch.padded_length for batch in batches] == [3, 7, 12]
    assert [batch.padding for batch in batches] == [[0, 0], [0], [2, 0]]
    assert total_padding(batches) == 2


def test_short_batch_not_always_last():
    batches = plan_batches([2, 2, 1], batch_size=2)

    assert [batch.members for batch in batches] == [[2], [0, 1]]
    assert total_padding(batches) == 0


def test_short_batch_last_on_tie():
    batches = plan_batches([4, 4, 4], batch_size=2)

    assert [batch.members for batch in batches] == [[0, 1], [2]]


def test_hand_example_input_order():
    lengths = [10, 3, 7, 3, 12]

    batches = plan_batches(lengths, batch_size=2, grouping=False)

    assert [batch.members for batch in batches] == [[0, 1], [2, 3], [4]]
    assert [batch.padded_length for batch in batches] == [10, 7, 12]
    assert [batch.padding for batch in batches] == [[0, 7], [0, 4], [0]]
    assert total_padding(batches) == 11


def test_empty_input():
    assert plan_batches([], batch_size=4) == []
    assert plan_batches([], batch_size=4, grouping=False) == []


@pytest.mark.parametrize("batch_size", [0, -3])
def test_batch_size_below_one(batch_size):
    with pytest.raises(ValueError, match=f"batch size must be at least 1, got {batch_size}"):
        plan_batches([1, 2], batch_size=batch_size)


def test_batch_larger_than_input():
    batches = plan_batches([5, 1, 3], batch_size=8)

    assert len(batches) == 1
    assert batches[0].members == [1, 2, 0]
    assert batches[0].padding == [4, 2, 0]


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_strategy, batch_size=batch_size_strategy, grouping=st.booleans())
def test_every_index_once(lengths, batch_size, grouping):
    batches = plan_batches(lengths, batch_size, grouping)

    members = [member for batch in batches for member in batch.members]
    assert sorted(members) == list(range(len(lengths)))
    assert [batch.index for batch in batches] == list(range(len(batches)))
    assert len(batches) == -(-len(lengths) // batch_size)
    assert sum(len(batch.members) < batch_size for batch in batches) <= 1
    assert all(1 <= len(batch.members) <= batch_size for batch in batches)
    for batch in batches:
        assert batch.lengths == [lengths[member] for member in batch.members]
    if not grouping:
        assert members == list(range(len(lengths)))
        assert all(len(batch.members) == batch_size for batch in batches[:-1])


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_strategy, batch_size=batch_size_strategy)
def test_grouped_lengths_non_decreasing(lengths, batch_size):
    batches = plan_batches(lengths, batch_size)

    ordered = [length for batch in batches for length in batch.lengths]
    assert ordered == sorted(lengths)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=4), max_size=40), batch_size=batch_size_strategy)
def test_equal_lengths_keep_input_order(lengths, batch_size):
    # Few distinct lengths, so most examples have ties.
    batches = plan_batches(lengths, batch_size)

    members = [member for batch in batches for member in batch.members]
    for length in set(lengths):
        tied = [member for member in members if lengths[member] == length]
        assert tied == sorted(tied)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_strategy, batch_size=batch_size_strategy)
def test_grouping_never_adds_padding(lengths, batch_size):
    grouped = plan_batches(lengths, batch_size, grouping=True)
    in_order = plan_batches(lengths, batch_size, grouping=False)

    assert total_padding(grouped) <= total_padding(in_order)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy.filter(bool), batch_size=batch_size_strategy, grouping=st.booleans())
def test_padding_matches_longest(lengths, batch_size, grouping):
    for batch in plan_batches(lengths, batch_size, grouping):
        assert batch.padded_length == max(batch.lengths)
        assert [length + pad for length, pad in zip(batch.lengths, batch.padding)] == [
            batch.padded_length
        ] * len(batch.members)
        assert min(batch.padding) == 0


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=6), batch_size=st.integers(1, 4))
def test_grouping_padding_is_minimal(lengths, batch_size):
    # Brute force over every order of the prompts, cut into the same batch
    # sizes as plan_batches uses without grouping (all full, then the rest).
    def padding_of(order):
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        return sum(len(chunk) * max(chunk) - sum(chunk) for chunk in chunks)

    best = min(padding_of(list(order)) for order in itertools.permutations(lengths))

    assert total_padding(plan_batches(lengths, batch_size)) == best
