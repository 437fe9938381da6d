"""Tests of the eviction policies against plain-Python reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skipkv_cli.policies import (
    H2O,
    METHODS,
    RKV,
    LayerState,
    SkipKV,
    SnapKV,
    StreamingLLM,
    importance,
    make_policy,
    redundancy,
)


def reference_importance(keys, queries, valid, window, kernel):
    """Loop version of `importance` for one (row, KV head) at a time, in float64."""
    batch, kv_heads, length, dim = keys.shape
    query_heads, count = queries.shape[1], queries.shape[2]
    group = query_heads // kv_heads
    result = torch.zeros(batch, kv_heads, length, dtype=torch.float64)
    for b in range(batch):
        for kv in range(kv_heads):
            scored = [j for j in range(length - window) if valid[b, kv, j]]
            query_slots = [i for i in range(count) if valid[b, kv, length - count + i]]
            mean = {j: 0.0 for j in scored}
            for i in query_slots:
                best = {j: 0.0 for j in scored}
                for g in range(group):
                    q = queries[b, kv * group + g, i].double()
                    logits = {j: float(q @ keys[b, kv, j].double()) / math.sqrt(dim) for j in scored}
                    top = max(logits.values())
                    total = sum(math.exp(v - top) for v in logits.values())
                    for j in scored:
                        best[j] = max(best[j], math.exp(logits[j] - top) / total)
                for j in scored:
                    mean[j] += best[j] / max(len(query_slots), 1)
            half = kernel // 2
            for j in scored:
                result[b, kv, j] = max(mean[n] for n in scored if abs(n - j) <= half)
    return result


def reference_redundancy(keys, valid, window, threshold=0.5):
    """Loop version of `redundancy` in float64."""
    batch, kv_heads, length, _ = keys.shape
    result = torch.zeros(batch, kv_heads, length, dtype=torch.float64)
    for b in range(batch):
        for kv in range(kv_heads):
            real = [j for j in range(length) if valid[b, kv, j]]
            unit = {j: keys[b, kv, j].double() / keys[b, kv, j].double().norm() for j in real}
            cosine = {(i, j): float(unit[i] @ unit[j]) if i != j else 0.0 for i in real for j in real}
            for i in real:
                similar = [j for j in real if cosine[i, j] > threshold]
                if similar:
                    cosine[i, max(similar)] = 0.0
            column = {j: sum(cosine[i, j] for i in real) / len(real) for j in real}
            top = max(column.values())
            total = sum(math.exp(v - top) for v in column.values())
            for j in real:
                if j < length - window:
                    result[b, kv, j] = math.exp(column[j] - top) / total
    return result


def make_state(keys, queries=None, positions=None, accumulated=None, penalty=None) -> LayerState:
    batch, kv_heads, length, _ = keys.shape
    if positions is None:
        positions = torch.arange(length).expand(batch, kv_heads, length).clone()
    return LayerState(
        keys=keys,
        values=keys.clone(),
        queries=queries,
        positions=positions,
        accumulated=accumulated,
        penalty=penalty,
    )


def left_padded_positions(batch, kv_heads, length, padding):
    """Positions for rows whose first padding[b] slots are left padding."""
    positions = torch.empty(batch, kv_heads, length, dtype=torch.long)
    for b, pad in enumerate(padding):
        positions[b] = torch.cat([torch.full((pad,), -1), torch.arange(length - pad)])
    return positions


def test_importance_hand_values_no_pooling():
    # One KV head, one query head, one query, window 1: slot 3 is the window.
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]]])
    queries = torch.tensor([[[[2.0, 0.0]]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    result = importance(keys, queries, valid, window=1, pool_kernel=1)
    logits = [2 / math.sqrt(2), 0.0, 2 / math.sqrt(2)]
    total = sum(math.exp(v) for v in logits)
    expected = [math.exp(v) / total for v in logits] + [0.0]
    assert result.dtype == torch.float32
    assert result[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_importance_pooling_hand_values():
    # All keys but slot 1 are zero and share one logit. Slot 1 gets three times their weight.
    keys = torch.zeros(1, 1, 7, 2)
    keys[0, 0, 1, 0] = math.log(3.0) * math.sqrt(2)  # exp(logit) = 3 for the query (1, 0)
    queries = torch.tensor([[[[1.0, 0.0]]]])
    valid = torch.ones(1, 1, 7, dtype=torch.bool)
    result = importance(keys, queries, valid, window=2, pool_kernel=3)
    # Scored slots 0..4 have weights 1, 3, 1, 1, 1 out of 7.
    expected = [3 / 7, 3 / 7, 3 / 7, 1 / 7, 1 / 7, 0.0, 0.0]
    assert result[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_importance_gqa_max_and_query_mean():
    torch.manual_seed(1)
    keys = torch.randn(2, 2, 12, 4)
    queries = torch.randn(2, 6, 3, 4)  # groups of 3 query heads per KV head
    valid = torch.ones(2, 2, 12, dtype=torch.bool)
    result = importance(keys, queries, valid, window=3, pool_kernel=5)
    expected = reference_importance(keys, queries, valid, window=3, kernel=5)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


def test_importance_gqa_uses_own_query_heads():
    # Query heads 0 and 1 belong to KV head 0, heads 2 and 3 to KV head 1.
    # Moving the second group's queries must leave KV head 0 unchanged.
    torch.manual_seed(2)
    keys = torch.randn(1, 2, 10, 4)
    queries = torch.randn(1, 4, 2, 4)
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    before = importance(keys, queries, valid, window=2, pool_kernel=1)
    queries[:, 2:] = torch.randn(1, 2, 2, 4)
    after = importance(keys, queries, valid, window=2, pool_kernel=1)
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_importance_ignores_padding():
    torch.manual_seed(3)
    keys = torch.randn(1, 1, 12, 4) * 3
    queries = torch.randn(1, 2, 4, 4)
    keys = keys.expand(1, 2, 12, 4).clone()
    positions = left_padded_positions(1, 2, 12, [0])
    positions[0, 1, :4] = -1
    result = importance(keys, queries, positions >= 0, window=4, pool_kernel=7)
    expected = reference_importance(keys, queries, positions >= 0, window=4, kernel=7)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)
    assert result[0, 1, :4].tolist() == [0.0] * 4


def test_redundancy_recent_duplicate_rule():
    e1, e2, e3 = torch.eye(3)
    # Slots 0, 2, 4 share key e1; slot 5 is the window.
    keys = torch.stack([e1, e2, e1, e3, e1, e2]).reshape(1, 1, 6, 3)
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    result = redundancy(keys, valid, window=1)
    # Row 0 drops slot 4, row 2 drops slot 4, row 4 drops slot 2.
    # Row 1 drops slot 5 (its e2 twin), row 5 drops slot 1, row 3 has no twin.
    # Column sums: slot 0: 2, slot 1: 0, slot 2: 1, slot 3: 0, slot 4: 0, slot 5: 0.
    means = [2 / 6, 0.0, 1 / 6, 0.0, 0.0, 0.0]
    total = sum(math.exp(m) for m in means)
    expected = [math.exp(m) / total for m in means[:5]] + [0.0]
    assert result[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert result[0, 0, 0] > result[0, 0, 2] > result[0, 0, 4]


def test_redundancy_matches_reference():
    torch.manual_seed(4)
    base = torch.randn(2, 2, 3, 8)
    # Noisy copies of three directions give many pairs above the threshold.
    keys = base[:, :, torch.randint(0, 3, (20,))] + 0.3 * torch.randn(2, 2, 20, 8)
    positions = left_padded_positions(2, 2, 20, [0, 5])
    valid = positions >= 0
    result = redundancy(keys, valid, window=4)
    expected = reference_redundancy(keys, valid, window=4)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-7)


def test_redundancy_below_threshold_uses_raw_cosine():
    # Cosine 0.3 is below the threshold, so no entry is dropped and the mean
    # uses the raw cosine.
    keys = torch.tensor([[[[1.0, 0.0], [0.3, math.sqrt(1 - 0.09)], [-1.0, 0.0]]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    result = redundancy(keys, valid, window=0)
    means = [(0.3 - 1.0) / 3, (0.3 - 0.3) / 3, (-1.0 - 0.3) / 3]
    total = sum(math.exp(m) for m in means)
    assert result[0, 0].tolist() == pytest.approx([math.exp(m) / total for m in means], abs=1e-6)


def test_rkv_score_mixes_importance_and_redundancy():
    torch.manual_seed(5)
    keys = torch.randn(2, 2, 16, 4)
    queries = torch.randn(2, 4, 3, 4)
    state = make_state(keys, queries)
    policy = RKV(budget=10, window=3, pool_kernel=3, mix_lambda=0.25)
    expected = 0.25 * reference_importance(keys, queries, state.valid, 3, 3) - 0.75 * reference_redundancy(
        keys, state.valid, 3
    )
    torch.testing.assert_close(policy.score(state).double(), expected, rtol=1e-5, atol=1e-7)


def test_skipkv_subtracts_sentence_penalty():
    torch.manual_seed(6)
    keys = torch.randn(1, 2, 16, 4)
    queries = torch.randn(1, 2, 3, 4)
    penalty = torch.zeros(1, 2, 16)
    penalty[0, :, 4:9] = 0.97
    state = make_state(keys, queries, penalty=penalty)
    rkv = RKV(budget=10, window=3).score(state)
    skip = SkipKV(budget=10, window=3).score(state)
    torch.testing.assert_close(skip, rkv - penalty)
    kept = SkipKV(budget=10, window=3).keep_indices(state)
    for head in range(2):
        assert not set(range(4, 9)) & set(kept[0, head].tolist())


def test_keep_indices_always_keeps_window():
    accumulated = torch.arange(20, 0, -1, dtype=torch.float32).expand(1, 2, 20).clone()
    state = make_state(torch.randn(1, 2, 20, 4), accumulated=accumulated)
    kept = H2O(budget=8, window=3).keep_indices(state)
    assert kept.shape == (1, 2, 8)
    assert kept[0, 0].tolist() == [0, 1, 2, 3, 4, 17, 18, 19]
    assert kept[0, 1].tolist() == [0, 1, 2, 3, 4, 17, 18, 19]


def test_h2o_keeps_largest_accumulated():
    accumulated = torch.tensor([[[0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0, 8.0, 7.0, 0.0, 0.0]]])
    state = make_state(torch.randn(1, 2, 8, 4), accumulated=accumulated)
    kept = H2O(budget=5, window=2).keep_indices(state)
    assert kept[0, 0].tolist() == [1, 3, 5, 6, 7]
    assert kept[0, 1].tolist() == [0, 4, 5, 6, 7]


def test_padding_never_kept_over_real_tokens():
    positions = left_padded_positions(1, 1, 12, [4])
    accumulated = torch.zeros(1, 1, 12)
    accumulated[0, 0, :4] = 100.0  # padding with the largest scores
    state = make_state(torch.randn(1, 1, 12, 4), positions=positions, accumulated=accumulated)
    kept = H2O(budget=6, window=2).keep_indices(state)
    assert min(kept[0, 0].tolist()) >= 4


def test_padding_kept_only_when_row_is_short():
    positions = left_padded_positions(1, 1, 12, [9])
    state = make_state(torch.randn(1, 1, 12, 4), positions=positions, accumulated=torch.rand(1, 1, 12))
    kept = H2O(budget=6, window=2).keep_indices(state)[0, 0].tolist()
    assert set(range(9, 12)) <= set(kept)
    assert len(kept) == 6


def test_streamingllm_sinks_are_first_real_tokens():
    positions = left_padded_positions(2, 1, 20, [0, 3])
    state = make_state(torch.randn(2, 1, 20, 4), positions=positions)
    kept = StreamingLLM(budget=10, window=2, sink_tokens=4).keep_indices(state)
    assert kept[0, 0].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    assert kept[1, 0].tolist() == [3, 4, 5, 6, 14, 15, 16, 17, 18, 19]


def test_keep_indices_short_cache_keeps_all():
    state = make_state(torch.randn(2, 2, 6, 4), accumulated=torch.rand(2, 2, 6))
    kept = H2O(budget=8, window=2).keep_indices(state)
    assert kept.shape == (2, 2, 6)
    assert kept[1, 1].tolist() == list(range(6))


def test_scores_are_float32_for_bf16_keys():
    torch.manual_seed(7)
    keys = torch.randn(1, 2, 16, 8).bfloat16()
    queries = torch.randn(1, 4, 2, 8).bfloat16()
    state = make_state(keys, queries, penalty=torch.zeros(1, 2, 16))
    for policy in (SnapKV(8, 2), RKV(8, 2), SkipKV(8, 2)):
        assert policy.score(state).dtype == torch.float32
        assert policy.keep_indices(state).shape == (1, 2, 8)


def test_make_policy_builds_each_method():
    assert make_policy("full", 64, 8, 0.1, 7, 4) is None
    for name in ("streamingllm", "h2o", "snapkv", "rkv", "skipkv"):
        policy = make_policy(name, 64, 8, 0.2, 5, 3)
        assert isinstance(policy, METHODS[name])
        assert policy.budget == 64
        assert policy.window == 8
    assert make_policy("rkv", 64, 8, 0.2, 5, 3).mix_lambda == 0.2
    assert make_policy("snapkv", 64, 8, 0.2, 5, 3).pool_kernel == 5
    assert make_policy("streamingllm", 64, 8, 0.2, 5, 3).sink_tokens == 3


def test_make_policy_rejects_invalid_options():
    with pytest.raises(ValueError, match="unknown method 'lru'"):
        make_policy("lru", 64, 8, 0.1, 7, 4)
    with pytest.raises(ValueError, match="budget"):
        make_policy("rkv", 8, 8, 0.1, 7, 4)
    with pytest.raises(ValueError, match="pool_kernel"):
        make_policy("snapkv", 64, 8, 0.1, 4, 4)
    with pytest.raises(ValueError, match="mix_lambda"):
        make_policy("rkv", 64, 8, 1.5, 7, 4)


def test_missing_inputs_raise():
    state = make_state(torch.randn(1, 1, 16, 4))
    with pytest.raises(ValueError, match="queries"):
        SnapKV(8, 2).keep_indices(state)
    with pytest.raises(ValueError, match="accumulated"):
        H2O(8, 2).keep_indices(state)
    state.queries = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="penalty"):
        SkipKV(8, 2).keep_indices(state)


def build_row(generator, length, dim, query_heads, kv_heads, window):
    keys = torch.randn(kv_heads, length, dim, generator=generator)
    # Repeated keys make the redundancy rule drop entries.
    keys[:, 1::3] = keys[:, 0:1] + 0.1 * torch.randn(kv_heads, len(range(1, length, 3)), dim, generator=generator)
    queries = torch.randn(query_heads, window, dim, generator=generator)
    accumulated = torch.rand(kv_heads, length, generator=generator)
    penalty = (torch.rand(kv_heads, length, generator=generator) > 0.7).float() * 0.96
    return keys, queries, accumulated, penalty


def pad_rows(rows, padding, generator):
    """Stack rows into one left-padded batch with random keys in the padding slots."""
    length = max(row[0].shape[1] + pad for row, pad in zip(rows, padding))
    kv_heads, _, dim = rows[0][0].shape
    keys = torch.randn(len(rows), kv_heads, length, dim, generator=generator) * 5
    accumulated = torch.rand(len(rows), kv_heads, length, generator=generator) * 10
    penalty = torch.zeros(len(rows), kv_heads, length)
    positions = torch.full((len(rows), kv_heads, length), -1, dtype=torch.long)
    for b, ((row_keys, _, row_acc, row_penalty), pad) in enumerate(zip(rows, padding)):
        real = row_keys.shape[1]
        assert real + pad == length
        keys[b, :, pad:] = row_keys
        accumulated[b, :, pad:] = row_acc
        penalty[b, :, pad:] = row_penalty
        positions[b, :, pad:] = torch.arange(real)
    queries = torch.stack([row[1] for row in rows])
    return LayerState(keys, keys.clone(), queries, positions, accumulated, penalty)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    real=st.integers(12, 40),
    padding=st.integers(1, 9),
    method=st.sampled_from(["streamingllm", "h2o", "snapkv", "rkv", "skipkv"]),
)
def test_keep_indices_invariant_to_left_padding(seed, real, padding, method):
    generator = torch.Generator().manual_seed(seed)
    window, budget = 3, 10
    row = build_row(generator, real, 8, query_heads=4, kv_heads=2, window=window)
    # A second, longer row sets the batch length so that row 0 gets `padding` slots.
    other = build_row(generator, real + padding, 8, query_heads=4, kv_heads=2, window=window)
    policy = make_policy(method, budget, window, 0.1, 3, 2)

    alone = policy.keep_indices(pad_rows([row], [0], generator))
    batched = policy.keep_indices(pad_rows([row, other], [padding, 0], generator))
    other_alone = policy.keep_indices(pad_rows([other], [0], generator))

    assert batched[0].tolist() == (alone[0] + padding).tolist()
    assert batched[1].tolist() == other_alone[0].tolist()


def test_scores_invariant_to_left_padding():
    generator = torch.Generator().manual_seed(11)
    row = build_row(generator, 30, 8, query_heads=6, kv_heads=2, window=4)
    alone = pad_rows([row], [0], generator)
    padded = pad_rows([row, build_row(generator, 37, 8, 6, 2, 4)], [7, 0], generator)
    policy = SkipKV(budget=12, window=4, pool_kernel=7)
    torch.testing.assert_close(policy.score(padded)[0, :, 7:], policy.score(alone)[0], rtol=1e-5, atol=1e-7)


def test_redundancy_chunked_matches_whole(monkeypatch):
    import skipkv_cli.policies as policies

    torch.manual_seed(12)
    keys = torch.randn(3, 2, 24, 8)
    valid = left_padded_positions(3, 2, 24, [0, 2, 5]) >= 0
    whole = redundancy(keys, valid, window=4)
    monkeypatch.setattr(policies, "_MAX_SIMILARITY_ENTRIES", 24 * 24 * 2)
    chunked = redundancy(keys, valid, window=4)
    torch.testing.assert_close(chunked, whole)
