"""KV-cache eviction policies: score every cached slot and pick the slots to keep.

A policy receives one layer of one batch at a time (`LayerState`) and returns, per
row and per KV head, the `budget` slots to keep in ascending slot order. The
last `window` slots are always kept. Every score is computed per row and per KV
head in float32, never on keys repeated to the query-head count.

Padding slots (position -1) take no part in any score: they are left out of
softmax denominators, cosine rows and columns, means and max-pooling. A row's
scores for its real tokens therefore do not depend on how much left padding the
batch added, so a row keeps the same real tokens alone or in a padded batch
(up to float rounding).

The token score follows R-KV (Cai et al., 2025, arXiv:2505.24133):
`mix_lambda * importance - (1 - mix_lambda) * redundancy`. SkipKV subtracts
the similarity of the redundant sentence each token belongs to.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "H2O",
    "METHODS",
    "RKV",
    "LayerState",
    "Policy",
    "SkipKV",
    "SnapKV",
    "StreamingLLM",
    "importance",
    "make_policy",
    "redundancy",
]

# Maximum number of cosine-matrix entries that `redundancy` allocates at once
# (float32, so 256 MiB). Larger batches are scored a few (row, head) pairs at
# a time, which bounds memory for long prompts.
_MAX_SIMILARITY_ENTRIES = 1 << 26


@dataclass
class LayerState:
    """Policy input for one layer of one batch: cached keys and values, slot positions and scoring signals."""

    keys: Tensor
    """(batch, kv_heads, slots, head_dim) cached keys after RoPE."""
    values: Tensor
    """(batch, kv_heads, slots, head_dim) cached values."""
    queries: Tensor | None
    """(batch, query_heads, w, head_dim) post-RoPE queries of the last w slots, w <= window."""
    positions: Tensor
    """(batch, kv_heads, slots) long: real-token position of each slot, -1 for padding."""
    accumulated: Tensor | None = None
    """(batch, kv_heads, slots) float32: attention each slot received, summed over decode steps."""
    penalty: Tensor | None = None
    """(batch, kv_heads, slots) float32: similarity of the flagged sentence of each slot's token, else 0."""

    @property
    def valid(self) -> Tensor:
        """(batch, kv_heads, slots) bool mask of slots that hold a real token."""
        return self.positions >= 0


def importance(keys: Tensor, queries: Tensor, valid: Tensor, window: int, pool_kernel: int) -> Tensor:
    """Return the attention that the last queries pay to each cached key, max-pooled over positions.

    Each query head takes softmax(QK^T / sqrt(head_dim)) over the real keys
    outside the last `window` slots. A KV head takes the maximum over its query
    heads (query head h belongs to KV head h // (query_heads // kv_heads)),
    then the mean over the queries of real tokens. Max-pooling with an odd
    `pool_kernel`, stride 1, runs over real non-window slots only, so neither
    padding nor the window changes a real token's value. R-KV's reference code
    takes the group maximum of the logits before the softmax. Here each query
    head normalises its own attention first, and the maximum is taken after.

    Shapes: keys (B, Hkv, L, D), queries (B, Hq, w, D) for the last w slots,
    valid (B, Hkv, L) bool. Returns (B, Hkv, L) float32, 0 on padding and on
    the last `window` slots.
    """
    batch, kv_heads, length, head_dim = keys.shape
    query_heads, query_count = queries.shape[1], queries.shape[2]
    if query_heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({query_heads}) are not a multiple of KV heads ({kv_heads}). "
            "Pass the queries of the same layer as the keys."
        )
    if query_count > length:
        raise ValueError(f"{query_count} queries for {length} cached slots. Pass at most one query per slot.")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd number of slots, got {pool_kernel}")
    group = query_heads // kv_heads

    # Query head h = kv_head * group + g, so this view puts each group under
    # its KV head. One (group * w, D) @ (D, L) product per KV head avoids the
    # broadcast copy of the keys that a 5-D matmul makes.
    grouped = queries.float().reshape(batch, kv_heads, group * query_count, head_dim)
    logits = grouped @ keys.float().transpose(-1, -2) / math.sqrt(head_dim)
    logits = logits.reshape(batch, kv_heads, group, query_count, length)

    scored = valid.clone()
    scored[..., max(length - window, 0) :] = False
    # A finite fill keeps rows without any scored key free of NaN. Their
    # uniform softmax is then zeroed by the mask.
    logits = logits.masked_fill(~scored[:, :, None, None, :], torch.finfo(torch.float32).min)
    probabilities = logits.softmax(dim=-1) * scored[:, :, None, None, :]
    per_query = probabilities.amax(dim=2)  # (B, Hkv, w, L)

    query_valid = valid[..., length - query_count :].float()  # (B, Hkv, w)
    query_total = query_valid.sum(dim=-1).clamp(min=1.0)
    mean = (per_query * query_valid.unsqueeze(-1)).sum(dim=2) / query_total.unsqueeze(-1)

    if pool_kernel == 1:
        return mean
    # Attention weights are >= 0 and unscored slots hold 0, so an unscored
    # neighbour never raises a real token's maximum.
    pooled = F.max_pool1d(mean, kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2)
    return pooled * scored


def redundancy(keys: Tensor, valid: Tensor, window: int, threshold: float = 0.5) -> Tensor:
    """Return how much each cached key repeats the other keys of its head.

    Per row and KV head: cosine similarity between all real keys (diagonal
    and padding entries set to 0). In each row i, the most recent key j with
    cosine > `threshold` represents the group of similar keys, so entry (i, j)
    is set to 0 and j scores as less redundant than its older look-alikes.
    Column j's score is the sum of its cosines divided by the row's number of
    real tokens, then a softmax over the real slots.

    The last `window` keys take part in every cosine and in the softmax, as
    in R-KV, but their own scores are set to 0 because they are always kept.
    Shapes: keys (B, Hkv, L, D), valid (B, Hkv, L). Returns (B, Hkv, L) float32,
    0 on padding and on the last `window` slots.
    """
    batch, kv_heads, length, head_dim = keys.shape
    flat_keys = keys.reshape(batch * kv_heads, length, head_dim)
    flat_valid = valid.reshape(batch * kv_heads, length)
    pairs_per_chunk = max(1, _MAX_SIMILARITY_ENTRIES // max(length * length, 1))
    chunks = []
    for start in range(0, batch * kv_heads, pairs_per_chunk):
        stop = start + pairs_per_chunk
        chunks.append(_redundancy_rows(flat_keys[start:stop], flat_valid[start:stop], threshold))
    scores = torch.cat(chunks).reshape(batch, kv_heads, length)
    scores[..., max(length - window, 0) :] = 0.0
    return scores


def _redundancy_rows(keys: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """`redundancy` for keys (N, L, D) and valid (N, L) with (row, head) pairs flattened."""
    length = keys.shape[1]
    # Zeroed padding keys give zero cosine rows and columns, so padding is never
    # similar to anything and adds nothing to the column sums.
    unit = F.normalize(keys.float(), dim=-1) * valid.unsqueeze(-1)
    cosine = unit @ unit.transpose(-1, -2)
    cosine.diagonal(dim1=-2, dim2=-1).zero_()

    # Slot j of a similar pair contributes j + 1, so the row maximum minus 1 is
    # the most recent similar slot, or -1 when the row has none. A float 0/1
    # mask written by torch.gt is the fastest form of this on CPU.
    similar = torch.empty_like(cosine)
    torch.gt(cosine, threshold, out=similar)
    slot_number = torch.arange(1, length + 1, device=keys.device, dtype=torch.float32)
    most_recent = similar.mul_(slot_number).amax(dim=-1, keepdim=True).long() - 1  # (N, L, 1)
    del similar
    has_similar = most_recent >= 0
    target = most_recent.clamp(min=0).long()
    kept_value = cosine.gather(-1, target) * ~has_similar
    cosine.scatter_(-1, target, kept_value)

    real_count = valid.sum(dim=-1, keepdim=True).clamp(min=1)
    column_mean = cosine.sum(dim=-2) / real_count
    column_mean = column_mean.masked_fill(~valid, torch.finfo(torch.float32).min)
    return column_mean.softmax(dim=-1) * valid


class Policy:
    """Base eviction policy: subclasses define `score`, this class picks the kept slots."""

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = True
    needs_accumulated: ClassVar[bool] = False
    needs_sentences: ClassVar[bool] = False

    def __init__(self, budget: int, window: int = 8) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 slot, got {window}")
        if budget <= window:
            raise ValueError(
                f"budget ({budget}) must be larger than window ({window}). Raise the budget or shrink the window."
            )
        self.budget = budget
        self.window = window

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget}, window={self.window})"

    def score(self, state: LayerState) -> Tensor:
        """Return (B, Hkv, L) float32 scores; higher means keep."""
        raise NotImplementedError

    def keep_indices(self, state: LayerState) -> Tensor:
        """Return the slots to keep, (B, Hkv, budget) long in ascending slot order.

        The last `window` slots are always kept. The other slots are ranked by
        `score`, and padding ranks below every real token, so padding is kept
        only when a row has fewer real tokens than the budget. Ties go to the
        earlier slot. When L <= budget, every slot is kept: (B, Hkv, L).
        """
        batch, kv_heads, length = state.positions.shape
        device = state.positions.device
        if length <= self.budget:
            return torch.arange(length, device=device).expand(batch, kv_heads, length).clone()

        scores = self.score(state).float()
        scores = scores.masked_fill(~state.valid, float("-inf"))
        scores[..., length - self.window :] = float("inf")
        # A stable sort breaks ties by slot order, which is the same alone and
        # in a padded batch. topk gives no such guarantee.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return order[..., : self.budget].sort(dim=-1).values

    def _require_queries(self, state: LayerState) -> Tensor:
        if state.queries is None:
            raise ValueError(f"policy {self.name!r} needs the layer's last queries, but LayerState.queries is None")
        return state.queries


class StreamingLLM(Policy):
    """Keep the first `sink_tokens` real tokens of each row (attention sinks) and the most recent ones."""

    name = "streamingllm"
    needs_queries = False

    def __init__(self, budget: int, window: int = 8, sink_tokens: int = 4) -> None:
        super().__init__(budget, window)
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be 0 or more, got {sink_tokens}")
        if sink_tokens + window > budget:
            raise ValueError(
                f"sink_tokens ({sink_tokens}) + window ({window}) exceed the budget ({budget}). "
                "Lower sink_tokens or raise the budget."
            )
        self.sink_tokens = sink_tokens

    def score(self, state: LayerState) -> Tensor:
        """Return the slot index as score (recent is higher), +inf on the first real tokens."""
        valid = state.valid
        length = valid.shape[-1]
        recency = torch.arange(length, device=valid.device, dtype=torch.float32).expand(valid.shape)
        real_rank = valid.cumsum(dim=-1)  # 1 on the first real token of the row
        sink = valid & (real_rank <= self.sink_tokens)
        return recency.masked_fill(sink, float("inf"))


class H2O(Policy):
    """Heavy-hitter oracle: keep the tokens with the largest attention summed over decode steps."""

    name = "h2o"
    needs_queries = False
    needs_accumulated = True

    def score(self, state: LayerState) -> Tensor:
        if state.accumulated is None:
            raise ValueError("policy 'h2o' needs accumulated attention, but LayerState.accumulated is None")
        return state.accumulated.float()


class SnapKV(Policy):
    """Keep the tokens that the last queries attend to most (max-pooled attention)."""

    name = "snapkv"

    def __init__(self, budget: int, window: int = 8, pool_kernel: int = 7) -> None:
        super().__init__(budget, window)
        if pool_kernel < 1 or pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd number of slots, got {pool_kernel}")
        self.pool_kernel = pool_kernel

    def score(self, state: LayerState) -> Tensor:
        queries = self._require_queries(state)
        return importance(state.keys, queries, state.valid, self.window, self.pool_kernel)


class RKV(SnapKV):
    """R-KV: attention importance minus key redundancy."""

    name = "rkv"

    def __init__(
        self,
        budget: int,
        window: int = 8,
        pool_kernel: int = 7,
        mix_lambda: float = 0.1,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(budget, window, pool_kernel)
        if not 0.0 <= mix_lambda <= 1.0:
            raise ValueError(f"mix_lambda must lie in [0, 1], got {mix_lambda}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"key-similarity threshold must lie in [-1, 1], got {threshold}")
        self.mix_lambda = mix_lambda
        self.threshold = threshold

    def score(self, state: LayerState) -> Tensor:
        attention = super().score(state)
        repeats = redundancy(state.keys, state.valid, self.window, self.threshold)
        return self.mix_lambda * attention - (1.0 - self.mix_lambda) * repeats


class SkipKV(RKV):
    """SkipKV: the R-KV score minus the similarity of each token's flagged sentence."""

    name = "skipkv"
    needs_sentences = True

    def score(self, state: LayerState) -> Tensor:
        if state.penalty is None:
            raise ValueError("policy 'skipkv' needs sentence penalties, but LayerState.penalty is None")
        return super().score(state) - state.penalty.float()


METHODS: dict[str, type[Policy] | None] = {
    "full": None,
    StreamingLLM.name: StreamingLLM,
    H2O.name: H2O,
    SnapKV.name: SnapKV,
    RKV.name: RKV,
    SkipKV.name: SkipKV,
}


def make_policy(
    method: str,
    budget: int,
    window: int,
    mix_lambda: float,
    pool_kernel: int,
    sink_tokens: int,
) -> Policy | None:
    """Build the policy for `method`, or return None for "full" (no eviction).

    Each policy takes only the options it uses; the others are ignored.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}. Choose one of: {', '.join(METHODS)}.")
    policy_class = METHODS[method]
    if policy_class is None:
        return None
    options = {"mix_lambda": mix_lambda, "pool_kernel": pool_kernel, "sink_tokens": sink_tokens}
    accepted = inspect.signature(policy_class.__init__).parameters
    return policy_class(budget, window, **{key: value for key, value in options.items() if key in accepted})
