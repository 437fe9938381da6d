"""Batch planning: group prompts of similar length so batches carry little padding.

Every batch is left-padded to its longest prompt, and the padding occupies KV
cache slots and attention work. Sorting prompts by token count before cutting
batches keeps prompts of similar length together.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PlannedBatch", "plan_batches"]


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of prompts, as indices into the input list."""

    index: int  # 0-based batch number
    members: list[int]  # input indices, in batch order (shortest first when grouping)
    lengths: list[int]  # prompt token counts, aligned with `members`

    @property
    def padded_length(self) -> int:
        """Token count that every member is left-padded to."""
        return max(self.lengths)

    @property
    def padding(self) -> list[int]:
        """Padding tokens per member, aligned with `members`."""
        return [self.padded_length - length for length in self.lengths]


def _batch_sizes(sorted_lengths: list[int], batch_size: int) -> list[int]:
    """Choose the sizes of consecutive batches over lengths sorted shortest first.

    All batches are full except one of the remainder size. Putting that short
    batch last is not always best: for lengths [1, 2, 2] and batch size 2,
    [1, 2] + [2] pads one token while [1] + [2, 2] pads none. The short batch
    goes where the padded token count, the sum of size * longest length over
    the batches, is smallest. Ties go to the latest position.
    """
    count = len(sorted_lengths)
    full_batches, remainder = divmod(count, batch_size)
    if remainder == 0:
        return [batch_size] * full_batches

    # Cost of the full batches before the short one: batch i ends at index
    # (i + 1) * batch_size - 1. After it, every end shifts by `remainder`.
    before = [0]
    for i in range(full_batches):
        before.append(before[-1] + batch_size * sorted_lengths[(i + 1) * batch_size - 1])
    after = [0]
    for i in reversed(range(full_batches)):
        after.append(after[-1] + batch_size * sorted_lengths[remainder + (i + 1) * batch_size - 1])
    after.reverse()  # after[j]: cost of full batches j.. placed after the short batch

    best_position = min(
        range(full_batches + 1),
        key=lambda j: (
            before[j] + remainder * sorted_lengths[j * batch_size + remainder - 1] + after[j],
            -j,
        ),
    )
    return [batch_size] * best_position + [remainder] + [batch_size] * (full_batches - best_position)


def plan_batches(lengths: list[int], batch_size: int, grouping: bool = True) -> list[PlannedBatch]:
    """Cut prompts into batches of at most `batch_size`, given their token counts.

    With `grouping`, prompts are sorted by length, shortest first, with equal
    lengths in input order, and the sorted list is cut into consecutive
    batches. Without it, batches follow the input order and the last batch is
    the short one. Either way, every batch but one is full. Empty input gives
    no batches. Raises ValueError when `batch_size` is less than 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")

    order = list(range(len(lengths)))
    if grouping:
        # sorted() is stable, so equal lengths keep their input order.
        order = sorted(order, key=lambda position: lengths[position])
        sizes = _batch_sizes([lengths[position] for position in order], batch_size)
    else:
        sizes = [min(batch_size, len(order) - start) for start in range(0, len(order), batch_size)]

    batches = []
    start = 0
    for size in sizes:
        members = order[start : start + size]
        batches.append(
            PlannedBatch(
                index=len(batches),
                members=members,
                lengths=[lengths[position] for position in members],
            )
        )
        start += size
    return batches
