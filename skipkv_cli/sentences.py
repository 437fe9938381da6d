"""Sentence segmentation of generated tokens and redundant-sentence flags for SkipKV.

A sentence ends at a token whose decoded text ends with a newline. Consecutive
newline tokens belong to the sentence they close, so a sentence is complete
when a token without a trailing newline follows one with it. A sentence's
embedding is the mean of the final hidden states (after the final norm) of its
tokens, L2-normalised. When a sentence completes, every earlier complete
sentence of the same row whose embedding has cosine > tau with it is flagged
with that cosine (the maximum over all later sentences). Eviction policies then
subtract the flag's cosine from the score of every token of the flagged
sentence, so repeated sentences leave the cache first and as whole units.

One `SentenceTracker` serves one batch. Rows never share state.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SentenceTracker", "delimiter_table"]

_delimiter_tables: weakref.WeakKeyDictionary[Any, Tensor] = weakref.WeakKeyDictionary()

# Initial number of sentence embeddings stored per row. The store doubles when full.
_INITIAL_SENTENCE_CAPACITY = 64


def delimiter_table(tokenizer) -> Tensor:
    """Return a (len(tokenizer),) bool CPU tensor: True where the token's text ends with "\\n".

    Each token is decoded alone with special tokens kept, so ".\\n", ")\\n",
    "\\n\\n" and "?\\n\\n" count, and "\\n " does not. The table is computed once
    per tokenizer object (about 0.4 s for a 49k vocabulary on one CPU core).
    """
    try:
        cached = _delimiter_tables.get(tokenizer)
    except TypeError:  # tokenizer objects that take no weak reference are not cached
        cached = None
    if cached is not None:
        return cached

    ids = [[token_id] for token_id in range(len(tokenizer))]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    table = torch.tensor([text.endswith("\n") for text in texts], dtype=torch.bool)
    try:
        _delimiter_tables[tokenizer] = table
    except TypeError:
        pass
    return table


class SentenceTracker:
    """Sentences, embeddings and redundancy flags of every row of one batch.

    Generated token t of row b sits at real position prompt_lengths[b] + t in
    the KV cache. Per-token and per-sentence state lives in (rows,
    max_new_tokens) tensors on `device`, because a row has at most one
    sentence per generated token.
    """

    def __init__(self, tokenizer, prompt_lengths: list[int], max_new_tokens: int, tau: float, device) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {tau}")
        if not prompt_lengths or min(prompt_lengths) < 0:
            raise ValueError(f"prompt_lengths must be a non-empty list of token counts >= 0, got {prompt_lengths}")

        rows = len(prompt_lengths)
        self.tokenizer = tokenizer
        self.tau = tau
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.delimiters = delimiter_table(tokenizer).to(self.device)
        self.prompt_lengths = torch.tensor(prompt_lengths, dtype=torch.long, device=self.device)
        self.prompt_max = max(prompt_lengths)
        self.next_step = 0

        def per_token(fill, dtype=torch.long):
            return torch.full((rows, max_new_tokens), fill, dtype=dtype, device=self.device)

        # Per generated token, -1 where the row fed no token at that step.
        self.tokens = per_token(-1)
        self.sentence_of_token = per_token(-1)

        # Per row: the open sentence is number `sentence_count`, which equals
        # the number of complete sentences.
        self.sentence_count = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.open_start = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.after_delimiter = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.hidden_sum: Tensor | None = None  # (rows, hidden) float32 of the open sentence
        self.embeddings: Tensor | None = None  # (rows, capacity, hidden) float32, unit length

        # Per sentence. `ends` are exclusive and -1 while the sentence is open.
        self.starts = per_token(-1)
        self.ends = per_token(-1)
        self.similarity = per_token(0.0, torch.float32)
        self.flagged_at = per_token(-1)
        self.evicted_at = per_token(-1)
        self.tokens_evicted = per_token(0)
        self.starts[:, 0] = 0

    @property
    def rows(self) -> int:
        return self.prompt_lengths.shape[0]

    def _is_delimiter(self, tokens: Tensor) -> Tensor:
        size = self.delimiters.shape[0]
        # Ids beyond the tokenizer (models often pad the embedding table) never end a sentence.
        return self.delimiters[tokens.clamp(0, size - 1)] & (tokens >= 0) & (tokens < size)

    def observe(self, step: int, tokens: Tensor, hidden: Tensor, active: Tensor) -> None:
        """Add the tokens fed at decode `step` and complete the sentences they close.

        tokens: (rows,) long, generated token number `step` (0-based) of each
        row. hidden: (rows, hidden) final hidden states of those tokens after
        the final norm. active: (rows,) bool, the rows still generating.
        Inactive rows are left unchanged. Steps must arrive in order from 0.
        """
        if step != self.next_step:
            raise ValueError(
                f"observe expected decode step {self.next_step}, got {step}. Call it once per step, in order."
            )
        if step >= self.max_new_tokens:
            raise ValueError(f"decode step {step} exceeds max_new_tokens ({self.max_new_tokens})")
        if tokens.shape != (self.rows,) or hidden.dim() != 2 or hidden.shape[0] != self.rows:
            raise ValueError(
                f"observe expects tokens ({self.rows},) and hidden ({self.rows}, hidden_size), "
                f"got {tuple(tokens.shape)} and {tuple(hidden.shape)}"
            )
        self.next_step += 1
        tokens = tokens.to(self.device)
        active = active.to(self.device, torch.bool)
        hidden = hidden.to(self.device, torch.float32)
        if self.hidden_sum is None:
            self.hidden_sum = torch.zeros_like(hidden)
            capacity = min(_INITIAL_SENTENCE_CAPACITY, self.max_new_tokens)
            self.embeddings = hidden.new_zeros(self.rows, capacity, hidden.shape[1])

        is_delimiter = self._is_delimiter(tokens)
        completing = active & self.after_delimiter & ~is_delimiter
        if bool(completing.any()):
            self._complete_sentences(step, completing)

        self.tokens[:, step] = torch.where(active, tokens, -1)
        self.sentence_of_token[:, step] = torch.where(active, self.sentence_count, -1)
        self.hidden_sum += hidden * active.unsqueeze(-1)
        self.after_delimiter = torch.where(active, is_delimiter, self.after_delimiter)

    def _complete_sentences(self, step: int, completing: Tensor) -> None:
        """Close the open sentence of each `completing` row at `step` and flag earlier look-alikes."""
        count = self.sentence_count
        self._reserve_embeddings(int(count.max()) + 1)
        capacity = self.embeddings.shape[1]
        row_index = torch.arange(self.rows, device=self.device)

        embedding = F.normalize(self.hidden_sum, dim=-1)
        # One batched product compares every completing row with all of its
        # earlier complete sentences; other rows are masked out.
        cosine = torch.bmm(self.embeddings, embedding.unsqueeze(-1)).squeeze(-1)  # (rows, capacity)
        earlier = torch.arange(capacity, device=self.device) < count.unsqueeze(-1)
        hit = earlier & completing.unsqueeze(-1) & (cosine > self.tau)

        flagged_at = self.flagged_at[:, :capacity]
        flagged_at.copy_(torch.where(hit & (flagged_at < 0), step, flagged_at))
        similarity = self.similarity[:, :capacity]
        similarity.copy_(torch.where(hit, torch.maximum(similarity, cosine), similarity))

        stored = self.embeddings[row_index, count]
        self.embeddings[row_index, count] = torch.where(completing.unsqueeze(-1), embedding, stored)
        self.ends[row_index, count] = torch.where(completing, step, self.ends[row_index, count])
        next_count = count + completing.long()
        next_slot = next_count.clamp(max=self.max_new_tokens - 1)
        self.starts[row_index, next_slot] = torch.where(completing, step, self.starts[row_index, next_slot])
        self.open_start = torch.where(completing, step, self.open_start)
        self.sentence_count = next_count
        self.hidden_sum = self.hidden_sum * ~completing.unsqueeze(-1)

    def _reserve_embeddings(self, needed: int) -> None:
        capacity = self.embeddings.shape[1]
        if needed <= capacity:
            return
        grown = min(max(needed, 2 * capacity), self.max_new_tokens)
        extra = self.embeddings.new_zeros(self.rows, grown - capacity, self.embeddings.shape[2])
        self.embeddings = torch.cat([self.embeddings, extra], dim=1)

    def penalty(self, positions: Tensor) -> Tensor:
        """Return (B, Hkv, L) float32: the flag similarity of each slot's sentence, else 0.

        positions: (B, Hkv, L) long real-token positions from the cache, -1 for
        padding. Prompt tokens, padding, unflagged sentences and the open
        sentence get 0.
        """
        batch = positions.shape[0]
        if batch != self.rows:
            raise ValueError(f"positions cover {batch} rows, but the tracker has {self.rows}")
        positions = positions.to(self.device)
        generated = positions - self.prompt_lengths.view(-1, *([1] * (positions.dim() - 1)))
        inside = (positions >= 0) & (generated >= 0) & (generated < self.max_new_tokens)
        flat_index = generated.clamp(0, self.max_new_tokens - 1).reshape(batch, -1)
        sentence = self.sentence_of_token.gather(1, flat_index)
        similarity = self.similarity.gather(1, sentence.clamp(min=0))
        inside = inside & (sentence >= 0).view_as(inside)
        return torch.where(inside, similarity.view_as(inside), 0.0)

    def record_cache(self, step: int, present: Tensor) -> None:
        """Update per-sentence eviction counts after a compaction at decode `step`.

        present: (rows, width) bool with width >= max(prompt_lengths) +
        max_new_tokens, indexed by real-token position, True where that token
        is still cached in at least one layer and KV head. Columns past the
        last generated position are ignored. A complete sentence whose tokens are all gone
        gets `evicted_at_step = step` the first time this is seen.
        """
        width = self.prompt_max + self.max_new_tokens
        if present.dim() != 2 or present.shape[0] != self.rows or present.shape[1] < width:
            raise ValueError(
                f"present must have shape ({self.rows}, width >= {width}), that is (rows, at least the max "
                f"prompt length + max_new_tokens), got {tuple(present.shape)}"
            )
        present = present.to(self.device, torch.bool)
        generated_positions = self.prompt_lengths.unsqueeze(-1) + torch.arange(self.max_new_tokens, device=self.device)
        cached = present.gather(1, generated_positions)

        observed = self.sentence_of_token >= 0
        sentence = self.sentence_of_token.clamp(min=0)
        evicted = torch.zeros_like(self.tokens_evicted).scatter_add_(1, sentence, (observed & ~cached).long())
        length = torch.zeros_like(self.tokens_evicted).scatter_add_(1, sentence, observed.long())
        self.tokens_evicted = evicted

        complete = torch.arange(self.max_new_tokens, device=self.device) < self.sentence_count.unsqueeze(-1)
        fully_evicted = complete & (length > 0) & (evicted == length) & (self.evicted_at < 0)
        self.evicted_at = torch.where(fully_evicted, step, self.evicted_at)

    def row_stats(self, row: int) -> dict:
        """Return {"sentences_flagged": int, "sentences_evicted": int} for one row.

        sentences_evicted counts flagged sentences whose tokens have all left the cache.
        """
        flagged = self.flagged_at[row] >= 0
        return {
            "sentences_flagged": int(flagged.sum()),
            "sentences_evicted": int((flagged & (self.evicted_at[row] >= 0)).sum()),
        }

    def row_trace(self, row: int, tokens: list[int]) -> list[dict]:
        """Return the trace entry of every sentence of `row`, in order.

        tokens: the row's generated ids, starting with every token passed to
        `observe` (a final token that was never fed, such as EOS, may follow).
        Unobserved tail tokens are segmented by the same rule, but their
        sentences were never compared, so they are never flagged. The last
        sentence gets "complete": False unless a token without a trailing
        newline followed it.
        """
        tokens = [int(token) for token in tokens]
        observed_count = int((self.tokens[row] >= 0).sum())
        observed = self.tokens[row, :observed_count].tolist()
        if tokens[:observed_count] != observed:
            raise ValueError(
                f"tokens of row {row} do not start with the {observed_count} tokens passed to observe. "
                "Pass the row's generated ids in order."
            )

        complete_count = int(self.sentence_count[row])
        spans = list(zip(self.starts[row, :complete_count].tolist(), self.ends[row, :complete_count].tolist()))
        start = int(self.open_start[row]) if observed_count else 0
        after_delimiter = bool(self.after_delimiter[row]) if observed_count else False
        tail = torch.tensor(tokens[observed_count:], dtype=torch.long, device=self.device)
        for offset, is_delimiter in enumerate(self._is_delimiter(tail).tolist(), start=observed_count):
            if after_delimiter and not is_delimiter:
                spans.append((start, offset))
                start = offset
            after_delimiter = is_delimiter
        last_complete = len(spans)
        if start < len(tokens):
            spans.append((start, len(tokens)))

        trace = []
        for index, (begin, end) in enumerate(spans):
            known = index < self.max_new_tokens
            flagged = known and int(self.flagged_at[row, index]) >= 0
            evicted_at = int(self.evicted_at[row, index]) if known else -1
            trace.append(
                {
                    "index": index,
                    "start": begin,
                    "end": end,
                    "text": self.tokenizer.decode(tokens[begin:end], skip_special_tokens=True),
                    "complete": index < last_complete,
                    "flagged": flagged,
                    "similarity": float(self.similarity[row, index]) if flagged else None,
                    "flagged_at_step": int(self.flagged_at[row, index]) if flagged else None,
                    "evicted_at_step": evicted_at if evicted_at >= 0 else None,
                    "tokens_evicted": int(self.tokens_evicted[row, index]) if known else 0,
                }
            )
        return trace
