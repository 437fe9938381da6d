"""KV cache with buffers allocated once per batch and compacted in place.

Each layer holds keys and values of shape (batch, kv_heads, capacity,
head_dim), written in place each step, so a decode step never copies the whole
cache. Beside them it keeps, per slot, the real-token position of the token
stored there (-1 for left padding) and, for H2O, the attention the slot has
received. Compaction gathers keep-indices per row and per KV head and moves the
kept slots, in their original order, to the front of the buffer.

Invariant the engine relies on: padding slots always come first in a row.
Prefill is left padded, compaction keeps slot order, and a policy keeps padding
only when the row has fewer real tokens than the budget, in which case every
head keeps all real tokens and the same number of padding slots.
"""

from __future__ import annotations

import torch

from skipkv_cli.compat import Cache, CacheLayerMixin, ModelShape


class CompactingLayer(CacheLayerMixin):
    """One decoder layer's cache: preallocated buffers plus per-slot positions."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        track_attention: bool,
    ):
        super().__init__()
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.key_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.value_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((batch_size, num_kv_heads, capacity), -1, dtype=torch.long, device=device)
        self.attention = (
            torch.zeros((batch_size, num_kv_heads, capacity), dtype=torch.float32, device=device)
            if track_attention
            else None
        )
        self.capacity = capacity
        self.length = 0
        self.device = device
        self.incoming_positions: torch.Tensor | None = None
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Buffers are allocated in __init__, where batch size and capacity are known.
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        count = key_states.shape[-2]
        end = self.length + count
        if end > self.capacity:
            raise RuntimeError(
                f"KV cache overflow: {end} slots needed, capacity is {self.capacity}; "
                "the engine must compact before the buffer is full"
            )
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        if self.incoming_positions is not None:
            self.positions[:, :, self.length : end] = self.incoming_positions[:, None, :]
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def compact(self, keep: torch.Tensor, masked: torch.Tensor | None = None) -> None:
        """Keep the slots `keep` (batch, kv_heads, kept), ascending, and move them to the front.

        `masked` (batch, kept) marks entries of `keep` that only fill a row up
        to the common length; they become padding slots (position -1).
        """
        kept = keep.shape[-1]
        index = keep.unsqueeze(-1).expand(-1, -1, -1, self.key_buffer.shape[-1])
        keys = torch.gather(self.keys, 2, index)
        values = torch.gather(self.values, 2, index)
        positions = torch.gather(self.positions[:, :, : self.length], 2, keep)
        if masked is not None:
            positions.masked_fill_(masked[:, None, :], -1)
        self.key_buffer[:, :, :kept].copy_(keys)
        self.value_buffer[:, :, :kept].copy_(values)
        self.positions[:, :, :kept].copy_(positions)
        self.positions[:, :, kept:].fill_(-1)
        if self.attention is not None:
            attention = torch.gather(self.attention[:, :, : self.length], 2, keep)
            if masked is not None:
                attention.masked_fill_(masked[:, None, :], 0.0)
            self.attention[:, :, :kept].copy_(attention)
            self.attention[:, :, kept:].zero_()
        self.length = kept
        self._refresh_views()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        self.positions.fill_(-1)
        if self.attention is not None:
            self.attention.zero_()
        self._refresh_views()


class CompactingCache(Cache):
    """A transformers Cache made of `CompactingLayer`s, one per decoder layer."""

    def __init__(
        self,
        shape: ModelShape,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        track_attention: bool = False,
    ):
        layers = [
            CompactingLayer(
                batch_size,
                shape.num_key_value_heads,
                shape.head_dim,
                capacity,
                dtype,
                device,
                track_attention,
            )
            for _ in range(shape.num_layers)
        ]
        super().__init__(layers=layers)
        self.capacity = capacity

    @property
    def length(self) -> int:
        """Slots in use, the same in every layer and row."""
        return self.layers[0].length

    def set_incoming_positions(self, positions: torch.Tensor) -> None:
        """Set the real-token positions (batch, new_tokens), -1 for padding, of the next update."""
        for layer in self.layers:
            layer.incoming_positions = positions

    def padding_slots(self) -> torch.Tensor:
        """Return the number of padding slots at the front of each row (batch,)."""
        layer = self.layers[0]
        return (layer.positions[:, 0, : layer.length] < 0).sum(dim=-1)

    def present_positions(self, num_positions: int) -> torch.Tensor:
        """Return (batch, num_positions) bool: position still cached in at least one layer and head."""
        first = self.layers[0]
        present = torch.zeros((first.positions.shape[0], num_positions + 1), dtype=torch.bool, device=first.device)
        for layer in self.layers:
            positions = layer.positions[:, :, : layer.length]
            # Padding (-1) goes to the extra last column, which is dropped.
            index = torch.where(positions < 0, num_positions, positions).flatten(1)
            present.scatter_(1, index, True)
        return present[:, :num_positions]

    def bytes_per_slot(self) -> int:
        """Bytes that one slot of one row takes across all layers, keys and values."""
        layer = self.layers[0]
        per_layer = layer.key_buffer[0, :, 0].numel() * layer.key_buffer.element_size()
        per_layer += layer.value_buffer[0, :, 0].numel() * layer.value_buffer.element_size()
        return per_layer * len(self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of all key and value buffers, as allocated."""
        total = 0
        for layer in self.layers:
            total += layer.key_buffer.numel() * layer.key_buffer.element_size()
            total += layer.value_buffer.numel() * layer.value_buffer.element_size()
        return total
